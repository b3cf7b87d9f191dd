"""Pretraining the tiny stand-ins for hub models (``make pretrain``): teacher and editors.

In the full profile these are downloaded: a text-to-image model (the DMD "real score") and
editors trained on paired data (InstructPix2Pix-like). In the tiny profile they are trained
here on ShapesWorld, seeded, and shipped in ``data/pretrained/`` in the hub layout, so every
later notebook loads them by path exactly as it would load a hub id.

* **teacher** - flow-matching text-to-image DiT (with its text encoder) on captions and renders;
  the caption is dropped 10% of the time so classifier-free guidance works (NP-Edit Sec. 3.2
  uses the teacher with CFG as the real score).
* **supervised editors** - initialised from the teacher (Kontext-style sequence concatenation)
  and trained with the plain flow-matching loss on pairs: *clean* pairs (NP-Edit's "trained on
  paired data" comparison) and *noisy* pairs (the InstructPix2Pix-like baseline of
  Multi-Reward). Both draw fresh pairs every step: a stand-in for a model trained on a large
  paired corpus.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nb_edit import world
from nb_edit.core.config import StageConfig
from nb_edit.core.images import to_tensor
from nb_edit.data.judge_qa import random_edit
from nb_edit.flow.losses import flow_matching_loss, logit_normal_t, uniform_t
from nb_edit.models.editors import build_editor, editor_from_teacher
from nb_edit.models.loaders import load_teacher, load_text_encoder, save_components
from nb_edit.models.text import NULL_TEXT, build_tiny_text_encoder, build_tokenizer
from nb_edit.models.tiny_configs import tiny_flux_config, tiny_unet_config
from nb_edit.models.vlm import questions
from nb_edit.rewards.single_turn import failure_text_words
from nb_edit.training.loop import LoopConfig, train


@dataclasses.dataclass
class PretrainConfig(StageConfig):
    """Sizes of one pretraining job (teacher or supervised editor)."""

    backbone: str = "unet"  # "unet" (InstructPix2Pix-style) | "dit" (FLUX.1-Kontext-style)
    unet_blocks: tuple = (16, 32, 32)  # the UNet's block_out_channels (its size: 0.43 M at these widths)
    steps: int = 4000  # teacher steps
    editor_steps: int = 3500  # supervised editor steps (they start from the teacher)
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    # "uniform" | "logit_normal" (SD3). Few-step sampling starts at t = 1, which logit-normal
    # almost never draws (P(t > 0.95) = 0.2%): a DiT editor trained that way predicted x0 at t = 1
    # with L1 0.49 against 0.11 for a plain copy of its source, and its 4-step edits failed.
    t_sampling: str = "uniform"
    text_dropout: float = 0.1  # share of empty captions / instructions (for CFG)
    styled_share: float = 0.15  # teacher: share of grayscale / colour-negative scenes
    edited_share: float = 0.5  # teacher: share of scenes that are targets of an edit
    # editors: train the text encoder with the editor. The teacher's encoder has only read
    # captions, never instructions (a hub editor's encoder has read far more text); whether
    # training it helps is measured in docs/experiments.md (its first run: not shown to help)
    tune_text_encoder: bool = False
    num_threads: int = 2
    world: dict = dataclasses.field(default_factory=lambda: world.WorldConfig().to_dict())

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(steps=4000, batch_size=32),
        "smoke": dict(steps=2, editor_steps=2, batch_size=4, warmup_steps=0, num_threads=1),
    }

    def loop(self, steps: int | None = None, ckpt_every: int = 200) -> LoopConfig:
        return LoopConfig(steps=self.steps if steps is None else steps, lr=self.lr, warmup_steps=self.warmup_steps,
                          schedule=self.schedule, optimizer="adamw", grad_clip=1.0, checkpoint_every=ckpt_every,
                          seed=self.seed)

    def t_sampler(self):
        if self.t_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"t_sampling={self.t_sampling!r} is unknown; use 'logit_normal' or 'uniform'.")
        return logit_normal_t() if self.t_sampling == "logit_normal" else uniform_t()


def build_teacher(backbone: str, resolution: int, unet_blocks: tuple):
    """A randomly initialised tiny text-to-image teacher of ``backbone`` (``tiny_configs``)."""
    if backbone == "unet":
        return build_editor("unet", tiny_unet_config(with_reference=False, sample_size=resolution,
                                                     block_out_channels=tuple(unet_blocks)))
    return build_editor(backbone, tiny_flux_config())


def world_tokenizer(world_cfg: world.WorldConfig, save_dir: Path | None = None):
    """The word-level tokenizer of the tiny text encoder: the world's words, the judge's, and those
    of the failure texts Multi-Reward's editor reads as its condition."""
    return build_tokenizer([" ".join(world.vocabulary(world_cfg)), " ".join(questions.template_words()),
                            " ".join(failure_text_words())], save_dir=save_dir)


def _rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, stream])  # data position = step: resumable


def teacher_batch(cfg: PretrainConfig, step: int) -> tuple[torch.Tensor, list[str]]:
    """Renders and captions: plain scenes, edit targets, and a share of styled scenes."""
    world_cfg, rng = world.WorldConfig.from_dict(cfg.world), _rng(cfg.seed, step, 0)
    scenes = []
    for _ in range(cfg.batch_size):
        scene = world.sample_scene(rng, world_cfg)
        if rng.random() < cfg.edited_share:
            scene = random_edit(scene, rng, world_cfg).target
        if scene.style == "normal" and rng.random() < cfg.styled_share:
            scene = dataclasses.replace(scene, style=str(rng.choice(["grayscale", "invert"])))
        scenes.append(scene)
    images = to_tensor(np.stack([world.render(s, world_cfg) for s in scenes]))
    captions = [NULL_TEXT if rng.random() < cfg.text_dropout else world.caption(s) for s in scenes]
    return images, captions


def pair_batch(cfg: PretrainConfig, step: int, noisy: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(source, target, instruction) pairs; with ``noisy`` the targets are corrupted as recorded."""
    world_cfg, rng = world.WorldConfig.from_dict(cfg.world), _rng(cfg.seed, step, 1)
    sources, targets, instructions = [], [], []
    for _ in range(cfg.batch_size):
        edit = random_edit(world.sample_scene(rng, world_cfg), rng, world_cfg)
        sources.append(world.render(edit.source, world_cfg))
        targets.append(world.noisy_target(edit, rng, world_cfg, with_verdict=False).image if noisy
                       else world.render(edit.target, world_cfg))
        instructions.append(NULL_TEXT if rng.random() < cfg.text_dropout else edit.instruction)
    return to_tensor(np.stack(sources)), to_tensor(np.stack(targets)), instructions


def train_teacher(cfg: PretrainConfig, out_dir: Path, ckpt_dir: Path) -> dict[str, Any]:
    """Train the text encoder and the teacher jointly; save both in the hub layout."""
    world_cfg = world.WorldConfig.from_dict(cfg.world)
    torch.manual_seed(cfg.seed)
    tokenizer = world_tokenizer(world_cfg)
    text_encoder = build_tiny_text_encoder(tokenizer)
    teacher = build_teacher(cfg.backbone, world_cfg.resolution, cfg.unet_blocks)

    def step_fn(batch, step):
        images, captions = batch
        states, pooled, _ = text_encoder.encode(captions)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        fn = lambda x, t: teacher(x, t, states, pooled)  # noqa: E731
        return {"loss": flow_matching_loss(fn, images, gen, cfg.t_sampler())}

    start = time.perf_counter()
    history = train(step_fn, {"teacher": teacher, "text_encoder": text_encoder}, config=cfg.loop(),
                    ckpt_dir=ckpt_dir, batch_fn=lambda step: teacher_batch(cfg, step),
                    run_config=cfg.to_dict())
    save_components(out_dir, editor=teacher, text_encoder=text_encoder)
    return _summary(history, start)


def train_supervised_editor(cfg: PretrainConfig, teacher_dir: Path, out_dir: Path, ckpt_dir: Path,
                            noisy: bool) -> dict[str, Any]:
    """An editor initialised from the teacher, trained on clean or noisy pairs (its text encoder too
    with ``cfg.tune_text_encoder``, else frozen)."""
    text_encoder = load_text_encoder(teacher_dir).requires_grad_(cfg.tune_text_encoder)
    editor = editor_from_teacher(load_teacher(teacher_dir, cfg.backbone)).requires_grad_(True)
    trained = {"editor": editor, **({"text_encoder": text_encoder} if cfg.tune_text_encoder else {})}

    def step_fn(batch, step):
        sources, targets, instructions = batch
        with torch.set_grad_enabled(cfg.tune_text_encoder):
            states, pooled, _ = text_encoder.encode(instructions)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        fn = lambda x, t: editor(x, t, states, pooled, source_latents=sources)  # noqa: E731
        return {"loss": flow_matching_loss(fn, targets, gen, cfg.t_sampler())}

    start = time.perf_counter()
    history = train(step_fn, trained, config=cfg.loop(cfg.editor_steps), ckpt_dir=ckpt_dir,
                    batch_fn=lambda step: pair_batch(cfg, step, noisy), run_config=cfg.to_dict())
    save_components(out_dir, editor=editor, text_encoder=text_encoder)
    return _summary(history, start)


def _summary(history, start: float) -> dict[str, Any]:
    losses = [h["loss"] for h in history]
    tail = losses[-min(50, len(losses)):]
    return {"steps": len(history), "final_loss": float(np.mean(tail)) if tail else float("nan"),
            "wall_s": time.perf_counter() - start, "loss_curve": losses[:: max(1, len(losses) // 200)]}


def write_made_by(out_dir: Path, name: str, cfg: PretrainConfig, summary: dict[str, Any]) -> None:
    """Record how a shipped stand-in was made: the command, its config and its training summary."""
    info = {"name": name, "command": "make pretrain", "config": cfg.to_dict(),
            **{k: v for k, v in summary.items() if k != "loss_curve"}}
    (out_dir / "made_by.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    (out_dir / "loss_curve.json").write_text(json.dumps(summary.get("loss_curve", [])))
