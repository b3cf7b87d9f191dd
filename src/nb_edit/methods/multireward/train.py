"""Multi-Reward as Condition: train an editor on noisy triplets with their rewards as input
(Sec. 4).

Data: noisy paired triplets annotated by ``rewards.single_turn.annotate_rewards`` (three 0-5 scores and
failure texts per record). Model: the shipped noisy-pair editor (or any editor folder) with a
LoRA adapter on its frozen base, wrapped with the zero-initialised reward condition
(``condition.RewardConditionedEditor``), so training starts from exactly the pretrained
editor. Loss: the plain flow-matching loss on the (noisy) target, Multi-Reward eq. 4 in the
flow convention; the scores and texts of a sample are dropped together to "unknown" with
probability ``condition_dropout``. Optimiser: 8-bit AdamW on the LoRA and the condition module,
through ``loop.train`` (EMA, clipping, checkpoints and resume come from the loop).

Placement (``core.runtime.placement``): the editor, the text encoder, the autoencoder and the
condition module are built on the accelerator's device; the frozen parts in ``dtype`` ("auto":
bf16 on CUDA, fp32 on CPU), the editor's frozen base quantised when ``quantization`` is "nf4"
or "int8" (CUDA only; not with ``lora_rank=0``, whose editor weights all train, in fp32). The
full profile is the paper's InstructPix2Pix at bf16 autocast, its batch of 32 as 4 micro-batches
of ``batch_size`` 8 per optimizer step (``gradient_accumulation_steps``, ``loop.train``).

Inference asks for the best: scores (5, 5, 5) and "None; None; None" in every CFG branch. The
"low" control asks for (1, 1, 1) with the failure text of the instruction not carried out; a
model that learned what the condition means edits worse under it (``compare_conditions``).
The ``noreward`` variant trains the same steps on the same data and batches without the
condition: the baseline. ``score_only`` and ``text_only`` read one kind of reward information
each (Table 4's ablation; ``condition.RewardCondition(parts=...)``).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nb_edit import world
from nb_edit.core import paths
from nb_edit.core.config import TrainingConfig
from nb_edit.core.images import to_tensor
from nb_edit.core.runtime import placement, to_device, trainable_in_fp32
from nb_edit.core.validation import BadInputError
from nb_edit.flow.losses import flow_matching_loss
from nb_edit.methods.multireward.condition import (
    BEST_SCORES,
    BEST_TEXT,
    REWARD_PARTS,
    UNKNOWN_TEXT,
    RewardCondition,
    RewardConditionedEditor,
    RewardEditPipeline,
    join_failure_texts,
)
from nb_edit.models.loaders import load_autoencoder, load_editor, load_text_encoder
from nb_edit.models.lora import attach_lora
from nb_edit.rewards.single_turn import (
    NO_FAILURE,
    PERSPECTIVES,
    PRESERVING_FALLBACK,
    QUALITY_FAILURE,
    not_followed_text,
)
from nb_edit.training.loop import (
    LoopConfig,
    check_training_device,
    enable_gradient_checkpointing,
    make_optimizer,
    train,
)

# the variant -> what its reward condition reads; "noreward" has none (the baseline). "score_only"
# and "text_only" are Table 4's ablation of the two kinds of reward information.
REWARD_VARIANTS: dict[str, tuple[str, ...]] = {"reward": REWARD_PARTS, "score_only": ("scores",), "text_only": ("text",)}
VARIANTS = ("noreward", *REWARD_VARIANTS)


@dataclasses.dataclass
class MultiRewardConfig(TrainingConfig):
    variant: str = "reward"  # one of VARIANTS: reward | noreward (no condition) | score_only | text_only (Table 4)
    backbone: str = "auto"  # "auto" (what the model folder holds) | "unet" | "dit"
    # "" = the profile's: the shipped noisy-pair editor data/pretrained/noisy (tiny), InstructPix2Pix (full)
    editor_id: str = ""
    # the VLM that scored the training triplets (their annotations name it too); training loads no judge
    judge_id: str = ""
    steps: int = 60  # optimizer steps (tiny: the main job's budget; the seed study sets its own)
    batch_size: int = 16
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2  # the paper's AdamW weight decay (on the LoRA; the condition module takes none)
    condition_lr_scale: float = 1.0  # the new condition module's lr = lr * this (it starts at zero, the LoRA does not)
    optimizer: str = "adamw8bit"
    lora_rank: int = 16  # 0 trains every weight of the editor (full fine-tuning, as the paper does)
    condition_dropout: float = 0.1  # scores and texts dropped together to "unknown"
    score_dim: int = 32  # sinusoidal embedding width per score
    hidden_dim: int = 64  # reward-condition width
    heads: int = 4
    # where Linear_2(c_R) enters (eq. 3): "time_embedding" (added to the timestep embedding, which
    # every block reads) or "blocks" (eq. 3 as written: added to each UNet block's output)
    injection: str = "time_embedding"
    shift: float = 1.0
    # evaluation (compare_conditions)
    sampling_steps: int = 4
    guidance: float = 1.0
    low_scores: tuple[float, float, float] = (1.0, 1.0, 1.0)  # the "low score" control
    grad_clip: float = 1.0
    ema_decay: float | None = None
    gradient_accumulation_steps: int = 1  # micro-batches of batch_size per optimizer step
    checkpoint_every: int = 100

    # gradient checkpointing and accumulation came after runs were cached (core.config)
    ADDED_LATER: ClassVar[dict[str, Any]] = {**TrainingConfig.ADDED_LATER, "gradient_checkpointing": False,
                                             "gradient_accumulation_steps": 1, "judge_id": "",
                                             "injection": "time_embedding"}

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {},
        "smoke": dict(steps=2, batch_size=2, checkpoint_every=1),
        # the paper's setting: InstructPix2Pix's UNet (epsilon-prediction, read as a flow velocity), its
        # batch of 32 as 4 micro-batches of 8 (the 0.9B UNet needs no quantisation on one GPU)
        "full": dict(editor_id="timbrooks/instruct-pix2pix", judge_id="Qwen/Qwen2.5-VL-7B-Instruct", steps=10000, batch_size=8,
                     gradient_accumulation_steps=4, lr=5e-5, lora_rank=64, score_dim=128, hidden_dim=768, heads=8,
                     sampling_steps=20, guidance=7.5, ema_decay=0.999, mixed_precision="bf16", checkpoint_every=500),
    }

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"MultiRewardConfig.variant={self.variant!r} is unknown; "
                             f"use one of {', '.join(VARIANTS)}.")
        if not self.condition_lr_scale > 0:
            raise ValueError(f"MultiRewardConfig.condition_lr_scale={self.condition_lr_scale} must be > 0 "
                             "(1.0 trains the condition module at the LoRA's learning rate).")
        if self.lora_rank < 0:
            raise ValueError(f"MultiRewardConfig.lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tuning).")
        if self.lora_rank == 0 and self.quantization is not None:
            raise BadInputError(f"MultiRewardConfig.quantization={self.quantization!r}", "lora_rank=0 trains every "
                                "weight of the editor, and quantised weights cannot train",
                                "set quantization=None, or lora_rank >= 1 (LoRA on the quantised base)")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"MultiRewardConfig.gradient_accumulation_steps={self.gradient_accumulation_steps} "
                             "must be >= 1 (1 = no accumulation).")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"MultiRewardConfig.condition_dropout={self.condition_dropout} must be in [0, 1).")
        self.betas, self.low_scores = tuple(self.betas), tuple(self.low_scores)


def _score(value) -> float:
    """A stored score as a float (numpy scalars included); NaN when missing or not a number."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else float("nan")


def record_condition(rewards: dict | None) -> tuple[list[float], str]:
    """(scores [3] with NaN for a missing one, joined failure text) of one record's ``rewards``."""
    rewards = rewards or {}
    scores = [_score(rewards.get(p)) for p in PERSPECTIVES]
    text = join_failure_texts(*(str(rewards.get(f"{p}_text", NO_FAILURE)) for p in PERSPECTIVES))
    return scores, text


def low_condition(instructions, edit_types=None, scores=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, list[str]]:
    """The "low score" control: low scores and the failure texts of an edit gone wrong."""
    edit_types = edit_types or [None] * len(instructions)
    texts = [join_failure_texts(not_followed_text(i, t), PRESERVING_FALLBACK, QUALITY_FAILURE)
             for i, t in zip(instructions, edit_types)]
    return np.tile(np.asarray(scores, dtype=np.float32), (len(instructions), 1)), texts


@dataclasses.dataclass
class RewardBatch:
    sources: torch.Tensor
    targets: torch.Tensor
    instructions: list[str]
    scores: np.ndarray  # [B, 3], NaN rows = dropped
    failure_texts: list[str]


class MultiRewardTrainer:
    def __init__(self, cfg: MultiRewardConfig, dataset, device: torch.device | str | None = None):
        """``device`` None: the accelerator's (what ``fit`` trains on)."""
        self.cfg = cfg
        self.placement = place = placement(cfg, device)
        self.device = place.device
        folder = cfg.editor_id or paths.pretrained_dir() / "noisy"
        # full fine-tuning (lora_rank=0) trains the editor's own weights: fp32, never quantised
        frozen_base = cfg.lora_rank > 0
        self.editor = to_device(load_editor(folder, cfg.backbone, quantization=place.quantization,
                                            dtype=place.dtype if frozen_base else torch.float32, device=self.device),
                                self.device)
        if frozen_base:
            attach_lora(self.editor, cfg.lora_rank)  # freezes the base; the adapter starts at zero
            trainable_in_fp32(self.editor)  # the adapter, made in the base's dtype
        else:
            self.editor.requires_grad_(True)  # full fine-tuning: the checkpoints keep every weight
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.editor, "MultiRewardConfig.gradient_checkpointing")
        text_encoder = load_text_encoder(folder, dtype=place.dtype, device=self.device)
        model = self.editor
        if cfg.variant in REWARD_VARIANTS:
            condition = RewardCondition.for_editor(self.editor, text_encoder.pooled_dim, injection=cfg.injection,
                                                   score_dim=cfg.score_dim, hidden_dim=cfg.hidden_dim, heads=cfg.heads,
                                                   parts=REWARD_VARIANTS[cfg.variant])
            model = RewardConditionedEditor(self.editor, condition.to(self.device))
        self.model = model
        self.pipe = RewardEditPipeline(model, text_encoder,
                                       load_autoencoder(folder, dtype=place.dtype, device=self.device), cfg.shift)
        self._load(dataset)

    def _load(self, dataset) -> None:
        records = list(dataset)
        unpaired = [r.id for r in records if not r.paired]
        if not records or unpaired:
            raise ValueError(f"Multi-Reward trains on paired triplets; {len(unpaired)} of {len(records)} records "
                             "have no target. Pass the noisy paired set annotated by rewards.single_turn.annotate_rewards.")
        if self.cfg.variant in REWARD_VARIANTS and not any(r.rewards for r in records):
            raise ValueError("the dataset holds no rewards; annotate it first with "
                             "rewards.single_turn.annotate_rewards(dataset, JudgeReward(judge), folder).")
        samples = [dataset.load(i) for i in range(len(dataset))]
        self.sources = np.stack([s["source"] for s in samples])
        self.targets = np.stack([s["target"] for s in samples])
        self.records = records
        self.conditions = [record_condition(r.rewards) for r in records]

    def batch(self, step: int) -> RewardBatch:
        rng = np.random.default_rng([self.cfg.seed, step, 13])  # data position = step (resumable)
        pick = rng.integers(len(self.records), size=self.cfg.batch_size)
        dropped = rng.random(self.cfg.batch_size) < self.cfg.condition_dropout  # same draws in both variants
        scores = np.array([self.conditions[i][0] for i in pick], dtype=np.float32)
        scores[dropped] = np.nan
        texts = [UNKNOWN_TEXT if d else self.conditions[i][1] for i, d in zip(pick, dropped)]
        return RewardBatch(to_tensor(self.sources[pick]).to(self.device), to_tensor(self.targets[pick]).to(self.device),
                           [self.records[i].instruction for i in pick], scores, texts)

    def step(self, batch: RewardBatch, step: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        cond = self.pipe.condition(batch.instructions, batch.sources, scores=batch.scores,
                                   failure_texts=batch.failure_texts)
        with torch.no_grad():
            x0 = self.pipe.autoencoder.encode(batch.targets)
        loss = flow_matching_loss(self.pipe.velocity_fn(cond), x0, gen)  # Multi-Reward eq. 4 (flow form)
        return {"loss": loss, "dropped": torch.tensor(float(np.isnan(batch.scores[:, 0]).mean()))}

    def fit(self, ckpt_dir: Path, progress: bool = True):
        cfg = self.cfg
        check_training_device(self.device, "MultiRewardTrainer")
        loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                          optimizer=cfg.optimizer, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay,
                          checkpoint_every=cfg.checkpoint_every, mixed_precision=self.placement.mixed_precision,
                          gradient_accumulation_steps=cfg.gradient_accumulation_steps, seed=cfg.seed)
        return train(self.step, {"editor": self.model}, config=loop, ckpt_dir=ckpt_dir, batch_fn=self.batch,
                     optimizers={"main": make_optimizer(self.param_groups(), loop)}, run_config=cfg.identity(),
                     progress=progress)

    def param_groups(self) -> list[dict]:
        """Two groups: the editor's trainable weights, its LoRA or (``lora_rank=0``) all of them
        (``lr``, ``weight_decay``), and the reward-condition module, which
        starts from zero (its output layers are zero-initialised, eq. 3) and has no pretrained
        value to stay near: ``lr * condition_lr_scale`` and no weight decay."""
        condition = getattr(self.model, "condition", None)
        cond_ids = {id(p) for p in condition.parameters()} if condition is not None else set()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in cond_ids]}]
        if cond_ids:
            groups.append({"params": [p for p in trainable if id(p) in cond_ids],
                           "lr": self.cfg.lr * self.cfg.condition_lr_scale, "weight_decay": 0.0})
        return groups


def train_multireward(cfg: MultiRewardConfig, dataset, ckpt_dir: Path, device: torch.device | str | None = None,
                      progress: bool = True) -> tuple[RewardEditPipeline, list]:
    """Train one variant; returns (a pipeline whose ``edit(..., scores=, failure_texts=)`` takes the
    requested reward (ignored by the ``noreward`` baseline), the loop's history). ``device`` None
    is the accelerator's device (CUDA when present, else CPU)."""
    torch.manual_seed(cfg.seed)
    trainer = MultiRewardTrainer(cfg, dataset, device)
    history = trainer.fit(ckpt_dir, progress=progress)
    return trainer.pipe, history


@torch.no_grad()
def compare_conditions(pipe: RewardEditPipeline, dataset, cfg: MultiRewardConfig | None = None, n: int = 64,
                       seed: int = 0, world_cfg: world.WorldConfig | None = None) -> dict[str, dict[str, float]]:
    """Oracle rates (followed, preserved, quality, success) on ``n`` held-out ShapesWorld edits
    under the best condition ((5, 5, 5), "None; None; None") and the low-score control
    (``cfg.low_scores`` with failure texts), sampled with ``cfg.sampling_steps`` and ``cfg.guidance``."""
    cfg = cfg or MultiRewardConfig()
    world_cfg = world_cfg or world.WorldConfig()
    records = [r for r in dataset if r.edit_json][:n]
    if not records:
        raise ValueError("compare_conditions needs ShapesWorld records (with edit_json), e.g. the test set.")
    edits = [world.Edit.from_dict(json.loads(r.edit_json), world_cfg) for r in records]
    sources = np.stack([world.render(e.source, world_cfg) for e in edits])
    instructions = [e.instruction for e in edits]
    low_scores_rows, low_texts = low_condition(instructions, [e.edit_type for e in edits], cfg.low_scores)
    settings = {"best": (BEST_SCORES, BEST_TEXT), "low": (low_scores_rows, low_texts)}
    out = {}
    for name, (scores, texts) in settings.items():
        edited = pipe.edit(sources, instructions, steps=cfg.sampling_steps, seed=seed, guidance=cfg.guidance,
                           scores=scores, failure_texts=texts)
        verdicts = [world.judge(s, e, o, world_cfg) for s, e, o in zip(sources, edits, edited)]
        out[name] = {k: float(np.mean([getattr(v, k) for v in verdicts]))
                     for k in ("followed", "preserved", "quality", "success")}
    return out


@torch.no_grad()
def condition_use(pipe: RewardEditPipeline, dataset, n: int = 128, max_score: float = 2.5, repeats: int = 4,
                  seed: int = 0) -> dict[str, float]:
    """Does the trained editor use its condition? The flow-matching loss (eq. 4) on annotated
    triplets judged as not followed (following score below ``max_score``), once under their own
    annotation and once under the best condition, with the same noise and times.

    An editor that reads the condition fits a failed target better when told that it failed:
    ``gap = loss_best - loss_own > 0``. A gap near 0 means the condition changes nothing.
    Returns ``{"loss_own", "loss_best", "gap", "n"}`` (NaN losses when no triplet qualifies).
    """
    records = list(dataset)
    rows = [i for i, r in enumerate(records)
            if _score((r.rewards or {}).get("following")) < max_score][:n]
    if not rows or not pipe.uses_reward:
        return {"loss_own": float("nan"), "loss_best": float("nan"), "gap": float("nan"), "n": float(len(rows))}
    samples = [dataset.load(i) for i in rows]
    sources = to_tensor(np.stack([s["source"] for s in samples])).to(pipe.device)
    x0 = pipe.autoencoder.encode(to_tensor(np.stack([s["target"] for s in samples])).to(pipe.device))
    instructions = [records[i].instruction for i in rows]
    own = [record_condition(records[i].rewards) for i in rows]
    settings = {"own": (np.array([s for s, _ in own], dtype=np.float32), [t for _, t in own]),
                "best": (BEST_SCORES, BEST_TEXT)}  # one condition for every row, as the pipeline takes it
    losses = {}
    for name, (scores, texts) in settings.items():
        cond = pipe.condition(instructions, sources, scores=scores, failure_texts=texts)
        losses[name] = float(np.mean([flow_matching_loss(pipe.velocity_fn(cond), x0,
                                                         torch.Generator().manual_seed(seed * 1000 + k)).item()
                                      for k in range(repeats)]))
    return {"loss_own": losses["own"], "loss_best": losses["best"], "gap": losses["best"] - losses["own"],
            "n": float(len(rows))}
