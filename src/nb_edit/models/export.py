"""Export an editor's LoRA in the format the stock diffusers pipelines load.

What is written: ``<folder>/pytorch_lora_weights.safetensors``, by diffusers' own
``save_lora_weights`` of the pipeline family, so the file is exactly what a diffusers training
script would have saved:

* ``"dit"`` (FLUX.1-Kontext): ``FluxLoraLoaderMixin.save_lora_weights(transformer_lora_layers=...)``;
  keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``. Read by
  ``FluxKontextPipeline.load_lora_weights(folder)`` (and ``FluxPipeline``'s).
* ``"unet"`` (InstructPix2Pix): ``StableDiffusionLoraLoaderMixin.save_lora_weights(unet_lora_layers=...)``;
  keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``conv_in`` included: its LoRA is a
  convolution pair). Read by ``StableDiffusionInstructPix2PixPipeline.load_lora_weights(folder)``.

The safetensors header holds ``lora_adapter_metadata`` (JSON, keys prefixed ``transformer.`` /
``unet.``): the ``LoraConfig`` fields rank, alpha, exact target module names, per-module rank and
alpha patterns. diffusers' loader builds its ``LoraConfig`` from it when present; without it the
loader guesses ``alpha = rank`` (scale 1), which would silently rescale an adapter trained with
another alpha.

The adapter's keys come from peft's ``get_peft_model_state_dict`` when a live module is given,
and from the same renaming (``<module>.lora_A.<adapter>.weight`` -> ``<module>.lora_A.weight``)
when a checkpoint's tensors are given; the editor wrapper's prefix (``backbone.``, and
``editor.backbone.`` for a Multi-Reward model) is removed so the names are the backbone's own.

Only the LoRA is written: the stock pipeline must be loaded from the same base the adapter was
trained on (for an NP-Edit UNet, the teacher widened by ``editor_from_teacher``).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from diffusers.loaders import FluxLoraLoaderMixin, StableDiffusionLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict
from torch import nn

from nb_edit.core.validation import BadInputError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
FAMILIES = ("unet", "dit")
# the stock pipeline each family's export is meant for (what the tests load it into)
PIPELINES = {"unet": "StableDiffusionInstructPix2PixPipeline", "dit": "FluxKontextPipeline"}
# adapter picked when several are attached: NP-Edit's generator (not its "fake" score), MT-EditFlow's
# policy (not the old policy), attach_lora's default (Multi-Reward)
PREFERRED_ADAPTERS = ("generator", "policy", "default")
# LoraConfig fields written as metadata: what diffusers' loader needs to rebuild the same scaling,
# and no more, so the file also loads with peft versions that lack this one's newer fields
METADATA_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                   "lora_bias", "bias", "lora_dropout")
WRAPPER_PREFIX = "backbone."  # Editor.backbone (and RewardConditionedEditor.editor.backbone)
_FAMILY_MARKERS = {"dit": ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder"),
                   "unet": ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out")}
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.(?P<param>weight|bias)$")


def _peft_holder(module: nn.Module) -> nn.Module:
    """The (sub)module peft recorded the adapters on: the one ``attach_lora`` was called with."""
    for sub in module.modules():
        if isinstance(getattr(sub, "peft_config", None), dict) and sub.peft_config:
            return sub
    raise BadInputError(type(module).__name__, "no LoRA adapter is attached to this module",
                        "attach one with nb_edit.models.lora.attach_lora (and train it) before exporting")


def choose_adapter(names, adapter_name: str | None, source: object = "the model") -> str:
    """``adapter_name`` if given (and present), the only adapter, or the first of :data:`PREFERRED_ADAPTERS`."""
    names = sorted(set(names))
    if adapter_name is not None:
        if adapter_name not in names:
            raise BadInputError(f"adapter_name={adapter_name!r}", f"no such adapter in {source} (it holds {names})",
                                f"pass one of {names}")
        return adapter_name
    if len(names) == 1:
        return names[0]
    for preferred in PREFERRED_ADAPTERS:
        if preferred in names:
            return preferred
    raise BadInputError(source, f"it holds several LoRA adapters ({names}) and none is a known trained one",
                        f"pass adapter_name= one of {names}")


def _strip_wrapper(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names relative to the diffusers backbone: drop everything up to the first ``backbone.``."""
    if not any(WRAPPER_PREFIX in key for key in state):
        return state  # LoRA attached to the bare backbone
    outside = [key for key in state if WRAPPER_PREFIX not in key]
    if outside:
        raise BadInputError(outside[0], "a LoRA weight outside the editor's backbone",
                            "export only the editor's backbone LoRA (the condition module is saved apart)")
    return {key[key.index(WRAPPER_PREFIX) + len(WRAPPER_PREFIX):]: value for key, value in state.items()}


def _module_state(module: nn.Module, adapter_name: str | None) -> tuple[dict[str, torch.Tensor], str, LoraConfig]:
    holder = _peft_holder(module)
    adapter = choose_adapter(holder.peft_config, adapter_name, type(module).__name__)
    config = holder.peft_config[adapter]
    state = get_peft_model_state_dict(holder, adapter_name=adapter)
    return _strip_wrapper(state), adapter, config


def _tensor_state(weights: Mapping[str, torch.Tensor], adapter_name: str | None) -> tuple[dict, str]:
    if any("lora_magnitude_vector" in key for key in weights):
        raise BadInputError("weights", "DoRA adapters (lora_magnitude_vector) are not exported",
                            "train a plain LoRA (attach_lora) for an export the stock pipelines read")
    matches = {key: _LORA_KEY.match(key) for key in weights}
    matches = {key: m for key, m in matches.items() if m is not None}
    if not matches:
        raise BadInputError("weights", "no LoRA tensors (<module>.lora_A.<adapter>.weight) in them; the run trained "
                            "without LoRA (lora_rank=0: full fine-tuning) or these are not an editor's weights",
                            "export a run trained with LoRA (lora_rank > 0); a fully fine-tuned backbone is a "
                            "whole model: save it with save_pretrained instead")
    adapter = choose_adapter({m["adapter"] for m in matches.values()}, adapter_name, "the weights")
    # peft's own key convention (get_peft_model_state_dict): the adapter name is dropped
    state = {f"{m['module']}.lora_{m['ab']}.{m['param']}": weights[key].detach()
             for key, m in matches.items() if m["adapter"] == adapter}
    return _strip_wrapper(state), adapter


def detect_family(state: Mapping[str, torch.Tensor]) -> str:
    """``"dit"`` or ``"unet"`` from the backbone module names of a LoRA state dict."""
    found = {family for key in state for family, markers in _FAMILY_MARKERS.items() if key.startswith(markers)}
    if len(found) != 1:
        raise BadInputError("LoRA weights", f"their module names fit {sorted(found) or 'neither'} of the families "
                            f"{FAMILIES} (first key: {next(iter(state), None)})",
                            "pass family='unet' (InstructPix2Pix UNet) or 'dit' (FLUX.1-Kontext transformer)")
    return found.pop()


def lora_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Rank of every adapted module: rows of its ``lora_A`` (a convolution's out-channels)."""
    return {key[: -len(".lora_A.weight")]: int(t.shape[0]) for key, t in state.items()
            if key.endswith(".lora_A.weight")}


def lora_adapter_metadata(state: Mapping[str, torch.Tensor], alpha_scale: float, use_rslora: bool = False) -> dict:
    """The ``LoraConfig`` fields diffusers' loader reads from the file's metadata.

    ``alpha_scale`` is ``lora_alpha / r`` (1 for ``attach_lora``'s default alpha): each module
    keeps its own scale whatever its rank. Target modules are the exact module names, so the
    loader adapts exactly the modules that were trained.
    """
    ranks = lora_ranks(state)
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {name: rank for name, rank in ranks.items() if rank != r}
    config = LoraConfig(r=r, lora_alpha=alpha_scale * r, target_modules=sorted(ranks), rank_pattern=rank_pattern,
                        alpha_pattern={name: alpha_scale * rank for name, rank in rank_pattern.items()},
                        use_rslora=use_rslora)
    fields = config.to_dict()
    return {name: sorted(fields[name]) if isinstance(fields[name], set) else fields[name] for name in METADATA_FIELDS}


@dataclass
class PeftLora:
    """One adapter in diffusers' peft key format, with what its metadata needs."""

    state: dict[str, torch.Tensor]  # <backbone module>.lora_A.weight / .lora_B.weight
    adapter: str  # the adapter's name in the nb_edit model
    family: str  # "unet" | "dit"
    alpha_scale: float  # lora_alpha / r
    use_rslora: bool = False

    @property
    def rank(self) -> int:
        return Counter(lora_ranks(self.state).values()).most_common(1)[0][0]


def peft_lora(source: nn.Module | Mapping[str, torch.Tensor], family: str = "auto", *,
              adapter_name: str | None = None, alpha: float | None = None) -> PeftLora:
    """``source``'s adapter as :class:`PeftLora` (see :func:`export_lora` for the arguments)."""
    if family not in (*FAMILIES, "auto"):
        raise BadInputError(f"family={family!r}", "unknown editor family",
                            "use 'unet' (InstructPix2Pix), 'dit' (FLUX.1-Kontext) or 'auto'")
    if isinstance(source, nn.Module):
        if alpha is not None:
            raise BadInputError("alpha", "a module's adapter records its own lora_alpha",
                                "leave alpha=None when exporting a module")
        state, adapter, config = _module_state(source, adapter_name)
        if config.use_dora:
            raise BadInputError(adapter, "DoRA adapters are not exported", "train a plain LoRA (attach_lora)")
        if config.rank_pattern or config.alpha_pattern:  # per-module scales are not read back here
            raise BadInputError(adapter, "adapters with rank_pattern / alpha_pattern are not exported",
                                "attach the LoRA with one rank and alpha (attach_lora)")
        scale, use_rslora = config.lora_alpha / config.r, bool(config.use_rslora)
    elif isinstance(source, Mapping):
        state, adapter = _tensor_state(source, adapter_name)
        rank = Counter(lora_ranks(state).values()).most_common(1)[0][0]
        scale, use_rslora = (1.0 if alpha is None else alpha / rank), False
    else:
        raise BadInputError("source", f"a {type(source).__name__}",
                            "pass an editor with LoRA attached or a checkpoint's weights (a dict of tensors)")
    found = detect_family(state)
    if family != "auto" and family != found:
        raise BadInputError(f"family={family!r}", f"the LoRA's modules are those of a {found!r} backbone",
                            f"pass family={found!r} (or 'auto')")
    state = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    return PeftLora(state, adapter, found, scale, use_rslora)


def write_lora(lora: PeftLora, folder: str | Path) -> Path:
    """Write ``lora`` with its family's diffusers ``save_lora_weights``; returns the file."""
    metadata = lora_adapter_metadata(lora.state, lora.alpha_scale, lora.use_rslora)
    folder = Path(folder)
    if lora.family == "dit":
        FluxLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=lora.state,
                                              transformer_lora_adapter_metadata=metadata,
                                              weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    else:
        StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers=lora.state,
                                                         unet_lora_adapter_metadata=metadata,
                                                         weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    return folder / LORA_WEIGHT_NAME


def export_lora(source: nn.Module | Mapping[str, torch.Tensor], family: str, folder: str | Path, *,
                adapter_name: str | None = None, alpha: float | None = None) -> Path:
    """Write ``source``'s LoRA to ``folder/pytorch_lora_weights.safetensors`` for the stock pipeline.

    ``source``: an editor (``UNetEditor``/``DiTEditor``, a ``RewardConditionedEditor``, or a bare
    backbone) with LoRA attached, or a checkpoint's tensors (``weights_editor.safetensors``).
    ``family``: ``"unet"``, ``"dit"`` or ``"auto"`` (from the module names). ``adapter_name``:
    which adapter (default: the only one, else generator / policy / default). ``alpha``: only
    for tensors, which do not record it (default: the rank, ``attach_lora``'s default); a
    module's own ``lora_alpha`` is used otherwise. Returns the written file.
    """
    return write_lora(peft_lora(source, family, adapter_name=adapter_name, alpha=alpha), folder)
