"""Export a trained run's newest intact checkpoint for the stock diffusers pipelines.

``export_checkpoint(ckpt_dir, to)`` writes into ``to``:

* ``pytorch_lora_weights.safetensors``: the editor's LoRA in diffusers' peft format with its
  ``lora_adapter_metadata`` (:func:`nb_edit.models.export.export_lora`); read by
  ``FluxKontextPipeline.load_lora_weights(to)`` (DiT runs) or
  ``StableDiffusionInstructPix2PixPipeline.load_lora_weights(to)`` (UNet runs);
* ``reward_condition.safetensors`` + ``reward_condition.json`` (Multi-Reward runs only): the
  reward-condition module's weights and its constructor sizes. No stock pipeline reads it (it
  adds to the timestep embedding and hooks the first feature tokens); :func:`attach_reward_condition`
  puts it back on an nb_edit editor, e.g. ``UNetEditor(pipe.unet)`` after ``load_lora_weights``;
* ``nb_edit_export.json``: what was exported: family, target pipeline, adapter, rank, alpha,
  checkpoint step, the run's base model field, whether the EMA weights were used and, for a
  UNet whose ``conv_in`` is adapted, the input channels its base must have (an NP-Edit UNet
  base is the teacher widened by ``editor_from_teacher``: save that widened UNet as the
  pipeline's ``unet/`` before ``load_lora_weights``).

The checkpoint is the newest one in ``ckpt_dir`` that passes the same integrity check a resume
uses (:func:`nb_edit.training.checkpoint.verify_checkpoint`: sizes and sha256); corrupt ones are
skipped with a warning and left in place (an export only reads). ``ckpt_dir`` may also be one
``step_*`` folder. The editor family comes from the run's ``backbone`` setting when it names one,
else from the LoRA's module names; the rank from the tensors. Checkpoints do not record LoRA
alpha: it is the run config's ``lora_alpha`` when present, else the rank (``attach_lora``'s
default, which every trainer uses), i.e. scale 1.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nb_edit.core.cache import CorruptFileWarning
from nb_edit.core.validation import BadInputError
from nb_edit.methods.multireward.condition import REWARD_PARTS, RewardCondition, RewardConditionedEditor
from nb_edit.methods.multireward.train import REWARD_VARIANTS
from nb_edit.models.export import FAMILIES, PIPELINES, peft_lora, write_lora
from nb_edit.training.checkpoint import MANIFEST, STEP_PREFIX, list_checkpoints, verify_checkpoint

CONDITION_WEIGHTS = "reward_condition.safetensors"
CONDITION_CONFIG = "reward_condition.json"
EXPORT_INFO = "nb_edit_export.json"
CONDITION_PREFIX = "condition."  # RewardConditionedEditor.condition in a checkpoint's weights
# the run-config field that names the frozen base each method trained its LoRA on
BASE_FIELDS = ("teacher_id", "editor_id", "policy_id")


# ------------------------------------------------------------------------ reward condition
def condition_sizes(condition: RewardCondition) -> dict[str, Any]:
    """The ``RewardCondition(...)`` arguments that rebuild ``condition``: its shapes and what it reads."""
    return {"text_dim": condition.text_proj[0].in_features, "time_embedding_dim": condition.to_time.out_features,
            "feature_dim": condition.to_tokens.out_features, "score_dim": condition.score_dim,
            "hidden_dim": condition.to_tokens.in_features, "heads": condition.attention.heads,
            "block_dims": [layer.out_features for layer in condition.to_blocks], "parts": list(condition.parts)}


def save_reward_condition(condition: RewardCondition, folder: str | Path) -> Path:
    """Write ``reward_condition.safetensors`` (its state dict) and ``reward_condition.json`` (its sizes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu").contiguous() for name, t in condition.state_dict().items()}
    save_file(state, folder / CONDITION_WEIGHTS, metadata={"format": "pt"})
    info = {"class": "nb_edit.methods.multireward.condition.RewardCondition", **condition_sizes(condition)}
    (folder / CONDITION_CONFIG).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder / CONDITION_WEIGHTS


def load_reward_condition(folder: str | Path) -> RewardCondition:
    """The module written by :func:`save_reward_condition` (evaluation mode, on the CPU)."""
    folder = Path(folder)
    try:
        info = json.loads((folder / CONDITION_CONFIG).read_text(encoding="utf-8"))
        state = load_file(folder / CONDITION_WEIGHTS)
    except (OSError, ValueError) as error:
        raise BadInputError(folder, f"no readable reward condition in it ({error})",
                            "export a Multi-Reward run (variant 'reward') with export_checkpoint") from error
    sizes = {name: int(info[name]) for name in ("text_dim", "time_embedding_dim", "feature_dim", "score_dim",
                                                "hidden_dim", "heads")}
    sizes["block_dims"] = [int(d) for d in info.get("block_dims", [])]  # eq. 3 per block (absent: none)
    sizes["parts"] = tuple(info.get("parts", REWARD_PARTS))  # what it reads (absent: scores and text)
    condition = RewardCondition(**sizes)
    condition.load_state_dict(state)  # strict: a file of another shape fails here, not in the forward
    return condition.eval()


def attach_reward_condition(editor, folder: str | Path) -> RewardConditionedEditor:
    """``editor`` (an nb_edit Editor, its LoRA loaded) wrapped with the condition saved in ``folder``."""
    condition = load_reward_condition(folder)
    sizes = condition_sizes(condition)
    wanted = {"time_embedding_dim": editor.time_embedding_dim, "feature_dim": editor.input_feature_dim}
    if sizes["block_dims"]:  # eq. 3 per block: the same blocks, the same widths
        wanted["block_dims"] = [dim for _, dim in editor.block_modules()] if hasattr(editor, "block_modules") else []
    wrong = {name: (sizes[name], value) for name, value in wanted.items() if sizes[name] != value}
    if wrong:
        raise BadInputError(folder, f"its reward condition was made for another editor (saved vs this editor: {wrong})",
                            "attach it to the editor family and size the run trained")
    device = next(editor.parameters()).device
    return RewardConditionedEditor(editor, condition.to(device))


def _condition_from_weights(weights: dict[str, torch.Tensor], heads: int,
                            parts: tuple[str, ...] = REWARD_PARTS) -> RewardCondition:
    state = {key[len(CONDITION_PREFIX):]: t for key, t in weights.items() if key.startswith(CONDITION_PREFIX)}
    hidden, score_in = state["score_mlp.0.weight"].shape
    blocks = sorted(int(k.split(".")[1]) for k in state if k.startswith("to_blocks.") and k.endswith(".weight"))
    condition = RewardCondition(text_dim=state["text_proj.0.weight"].shape[1],
                                time_embedding_dim=state["to_time.weight"].shape[0],
                                feature_dim=state["to_tokens.weight"].shape[0], score_dim=score_in // 3,
                                hidden_dim=hidden, heads=heads,
                                block_dims=[state[f"to_blocks.{i}.weight"].shape[0] for i in blocks], parts=parts)
    condition.load_state_dict(state)
    return condition


# ----------------------------------------------------------------------------- checkpoints
def newest_intact_checkpoint(ckpt_dir: str | Path) -> Path:
    """``ckpt_dir`` itself when it is one checkpoint, else its newest checkpoint that verifies."""
    path = Path(ckpt_dir)
    if (path / MANIFEST).is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = list(reversed(list_checkpoints(path)))
    else:
        raise BadInputError(path, "no such folder",
                            "pass a run's checkpoint folder (the one holding step_* folders) or one step_* folder")
    for candidate in candidates:
        problems = verify_checkpoint(candidate)
        if not problems:
            return candidate
        warnings.warn(f"checkpoint {candidate} is corrupt: {'; '.join(problems)}; trying the one before it",
                      CorruptFileWarning, stacklevel=3)
    if candidates:
        raise BadInputError(path, "no intact checkpoint in it (every one failed its checksums)",
                            "restore the checkpoints from a backup, or retrain the run")
    raise BadInputError(path, f"no complete checkpoint ({STEP_PREFIX}* folder with {MANIFEST}) in it",
                        "pass the folder a training run wrote its checkpoints into (TrainedRun.ckpt_dir), "
                        "or train the run first")


def _read_weights(ckpt: Path, module: str, use_ema: bool) -> dict[str, torch.Tensor]:
    file = ckpt / f"weights_{module}.safetensors"
    if not file.is_file():
        held = sorted(p.name for p in ckpt.glob("weights_*.safetensors"))
        raise BadInputError(file, f"no such weights file (the checkpoint holds {held})",
                            "pass module= the name the run saved its editor under")
    weights = load_file(file)
    if use_ema:
        ema_file = ckpt / f"ema_{module}.safetensors"
        if not ema_file.is_file():
            raise BadInputError(ema_file, "the run kept no EMA of its weights (ema_decay was None)",
                                "export with use_ema=False")
        ema = load_file(ema_file)  # the averaged trainable parameters, same names
        weights.update({name: t.to(weights[name].dtype) for name, t in ema.items() if name in weights})
    return weights


def export_checkpoint(ckpt_dir: str | Path, to: str | Path, *, adapter_name: str | None = None,
                      use_ema: bool = False, module: str = "editor") -> Path:
    """Export the newest intact checkpoint of ``ckpt_dir`` into folder ``to`` (see the module docstring).

    ``adapter_name``: which LoRA (default: NP-Edit's generator, MT-EditFlow's policy, or the only
    one). ``use_ema``: the EMA weights instead of the last ones. Returns ``to``.
    """
    ckpt = newest_intact_checkpoint(ckpt_dir)
    try:
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BadInputError(ckpt, f"its config.json or {MANIFEST} is unreadable ({error})",
                            "pass a checkpoint written by nb_edit's training loop") from error
    run = config.get("run") or manifest.get("stage_config") or {}
    weights = _read_weights(ckpt, module, use_ema)
    backbone = run.get("backbone")
    family = backbone if backbone in FAMILIES else "auto"
    alpha = run.get("lora_alpha")  # absent from today's configs: attach_lora's default alpha = rank
    lora = peft_lora(weights, family, adapter_name=adapter_name, alpha=None if alpha is None else float(alpha))
    to = Path(to)
    write_lora(lora, to)
    info = {"format": "diffusers peft LoRA (pytorch_lora_weights.safetensors with lora_adapter_metadata)",
            "family": lora.family, "pipeline": PIPELINES[lora.family], "adapter": lora.adapter, "rank": lora.rank,
            "lora_alpha": lora.alpha_scale * lora.rank, "step": manifest.get("step"), "checkpoint": ckpt.name,
            "ema": use_ema, "base_model": {name: run[name] for name in BASE_FIELDS if name in run},
            "reward_condition": False}
    if "conv_in.lora_A.weight" in lora.state:  # the UNet base must take this many input channels (2C: editor)
        info["base_in_channels"] = int(lora.state["conv_in.lora_A.weight"].shape[1])
    if any(key.startswith(CONDITION_PREFIX) for key in weights):
        if "heads" not in run:
            raise BadInputError(ckpt / "config.json", "the run config does not say the reward condition's heads",
                                "pass a Multi-Reward checkpoint written by MultiRewardTrainer")
        parts = REWARD_VARIANTS.get(run.get("variant", "reward"), REWARD_PARTS)  # Table 4's variants read one part
        save_reward_condition(_condition_from_weights(weights, int(run["heads"]), parts), to)
        info["reward_condition"] = True
    (to / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    return to

