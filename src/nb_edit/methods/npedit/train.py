"""NP-Edit: train a few-step editor without editing pairs (Sec. 3).

Per step, on a batch of (source, instruction, edited caption) - never a target image:

1. **Unroll** the generator G two steps with gradient through both (``flow.sampling.unroll_two_steps``):
   ``x0_hat = eps - G(eps, 1)``, re-noise at ``t`` from the 4-step schedule with fresh noise,
   ``x0 = x_t - t G(x_t, t)``. (The ``no_unroll`` ablation trains the one-step estimate ``x0_hat``
   alone; at inference every variant samples the same few steps.)
2. **VLM feedback** (Sec. 3.1): the frozen judge's yes/no logits for edit verification and
   identity preservation, ``L_vlm = -sum_j log sigmoid(l_target_j - l_other_j)``
   (``rewards.single_turn.JudgeReward.npedit_loss``), back-propagated through the decoder into G.
3. **Distribution matching** (Sec. 3.2): the teacher on the *edited caption* with CFG is the
   real score, a "fake" score trained online on G's outputs (``n_aux`` flow-matching updates
   per step) the fake one; their normalised difference is the gradient on ``x0``.
4. The two gradients on ``x0`` are combined as ``w_vlm g_vlm + lambda_dmd g_dmd``; with
   ``balance`` the VLM weight is set each step so that ``||w_vlm g_vlm|| = lambda_vlm ||g_dmd||``
   (their loss *values* differ by orders of magnitude, their gradients need not). One backward
   pass then carries the sum through G. Both gradient norms are recorded.

Generator, teacher and fake score share ONE frozen base: G and the fake score are two LoRA
adapters on the teacher's weights, the teacher is the base with adapters disabled (a DiT
editor sees the source through Kontext-style sequence concatenation; a UNet's widened
``conv_in`` has zero reference weights in the base, so either starts as the teacher).
``copy_warmup_steps`` of reference-copy warm-up (flow matching towards the source itself) come
before the main stage. A share ``noop_share`` of "do nothing" samples adds an MSE to the source
(the paper's 1%).

Placement (``core.runtime.placement``): the base, the text encoder, the autoencoder and the judge
are built on the accelerator's device; the frozen ones in ``dtype`` ("auto": bf16 on CUDA, fp32
on CPU), the base and the judge quantised with bitsandbytes when ``quantization`` is "nf4" or
"int8" (CUDA only), the LoRA adapters in fp32. The full profile is FLUX.1-Kontext-dev with a
Qwen2.5-VL judge, both NF4, bf16 autocast and gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from nb_edit import world
from nb_edit.core import cache, paths
from nb_edit.core.config import TrainingConfig
from nb_edit.core.images import to_tensor
from nb_edit.core.runtime import placement, process_rank, to_device, trainable_in_fp32
from nb_edit.core.validation import BadInputError
from nb_edit.data.judge_qa import random_edit
from nb_edit.flow.losses import flow_matching_loss, uniform_t
from nb_edit.flow.pipeline import EditPipeline
from nb_edit.flow.sampling import one_step_estimate, unroll_two_steps
from nb_edit.methods.npedit.dmd import dmd_generator_loss, fake_score_loss
from nb_edit.models.editors import UNetEditor, editing_base
from nb_edit.models.loaders import load_autoencoder, load_editor, load_text_encoder, save_components
from nb_edit.models.lora import (
    active_adapter,
    adapters_disabled,
    attach_lora,
    lora_parameters,
    merged_copy,
    set_active_adapter,
)
from nb_edit.models.vlm.judge import VLMJudge
from nb_edit.rewards.formulas import temperature_ramp
from nb_edit.rewards.single_turn import JudgeReward
from nb_edit.training.loop import (
    LoopConfig,
    check_training_device,
    enable_gradient_checkpointing,
    make_optimizer,
    train,
)

VARIANTS = ("full", "dmd_only", "vlm_only", "no_identity", "full_vocab", "no_unroll")  # the paper's ablations


_DEFAULT_WORLD = world.WorldConfig().to_dict()  # the world of runs made before NPEditConfig.world existed


@dataclasses.dataclass
class NPEditConfig(TrainingConfig):
    variant: str = "full"  # one of VARIANTS: full | dmd_only | vlm_only | no_identity | full_vocab | no_unroll
    backbone: str = "auto"  # "auto" (what the model folder holds) | "unet" | "dit"
    teacher_id: str = ""  # "" = the profile's: the shipped stand-in (tiny), FLUX.1-Kontext-dev (full)
    judge_id: str = ""  # "" = the profile's: the shipped stand-in (tiny), Qwen2.5-VL-7B-Instruct (full)
    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    betas: tuple[float, float] = (0.0, 0.9)  # NP-Edit / DMD2 use beta1 = 0
    optimizer: str = "adamw8bit"
    lora_rank: int = 16
    sampling_steps: int = 4
    shift: float = 1.0
    guidance: float = 2.0  # CFG of the real score
    n_aux: int = 2  # fake-score updates per generator step
    lambda_vlm: float = 1.0
    lambda_dmd: float = 1.0
    balance: bool = True
    noop_share: float = 0.01
    copy_warmup_steps: int = 0  # reference-copy warm-up before the main stage (the source is the target)
    copy_warmup_lr: float | None = None  # its learning rate; None = lr
    temperature_start: float = 1.0  # VLM logit temperature ramp (1.0 -> no ramp)
    temperature_steps: int = 0
    grad_clip: float = 2.0
    ema_decay: float | None = None
    checkpoint_every: int = 100
    curve_every: int = 50  # judge-vs-oracle checks during training
    n_curve: int = 64
    world: dict = dataclasses.field(default_factory=lambda: world.WorldConfig().to_dict())  # the curve's edits

    ADDED_LATER: ClassVar[dict[str, Any]] = {**TrainingConfig.ADDED_LATER, "world": _DEFAULT_WORLD}

    PROFILES: ClassVar[dict[str, dict[str, Any]]] = {
        # fits the main job's time; longer runs: steps=... in papermill. The warm-up at 2e-3 took a
        # UNet teacher's untouched-pixel L1 from 0.69 to 0.077 in 300 steps (0.15 at 5e-4)
        "tiny": dict(steps=100, curve_every=25, copy_warmup_steps=300, copy_warmup_lr=2e-3),
        "smoke": dict(steps=2, batch_size=2, n_aux=1, curve_every=1, n_curve=4, checkpoint_every=1,
                      copy_warmup_steps=1),
        # one GPU: the 12B base and the 7B judge in NF4 (LoRA on the 4-bit base, as QLoRA)
        "full": dict(teacher_id="black-forest-labs/FLUX.1-Kontext-dev", judge_id="Qwen/Qwen2.5-VL-7B-Instruct",
                     steps=4000, batch_size=4, lr=2e-5, lora_rank=64, guidance=3.5, n_aux=5, lambda_vlm=0.02,
                     balance=False, temperature_start=0.1, temperature_steps=2000, ema_decay=0.999,
                     gradient_checkpointing=True, mixed_precision="bf16", quantization="nf4", checkpoint_every=250,
                     curve_every=250, n_curve=64),
    }

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"NPEditConfig.variant={self.variant!r} is unknown; use one of {', '.join(VARIANTS)}.")
        self.betas = tuple(self.betas)


@dataclasses.dataclass
class UnpairedBatch:
    sources: torch.Tensor
    instructions: list[str]
    captions_edited: list[str]
    edit_types: list[str]


def load_unpaired(dataset) -> tuple[np.ndarray, list]:
    """Source images and records of a curated set; asserts that it holds no target image.

    An unreadable source image is skipped and counted in the dataset's counter (its
    ``metrics()`` go into the run's metrics), never silently dropped.
    """
    if dataset.n_paired:
        raise AssertionError(f"NP-Edit trains without pairs, but this dataset holds {dataset.n_paired} targets.")
    sources, records = [], []
    for i, record in enumerate(dataset):
        try:
            sources.append(dataset.load(i)["source"])  # never a "target" field
        except BadInputError as error:
            dataset.counter.skip("unreadable_source", f"{record.id}: {error}")
            continue
        records.append(record)
    dataset.counter.finish()
    return np.stack(sources), records


class NPEditTrainer:
    """Holds the shared base with its two adapters, the judge and the data; ``step`` is the loop's."""

    def __init__(self, cfg: NPEditConfig, dataset, device: torch.device | str | None = None):
        """``device`` None: the accelerator's (what ``fit`` trains on); another one serves only
        step-by-step use outside the loop (the CPU benchmarks)."""
        self.cfg = cfg
        self.placement = place = placement(cfg, device)
        self.device = place.device
        teacher = Path(cfg.teacher_id) if cfg.teacher_id else paths.pretrained_dir() / "teacher"
        judge_path = cfg.judge_id or paths.pretrained_dir() / "judge"
        base = load_editor(teacher, cfg.backbone, quantization=place.quantization, dtype=place.dtype,
                           device=self.device)
        if place.quantization and isinstance(base, UNetEditor) and not base.takes_reference:
            raise BadInputError(f"NPEditConfig.quantization={cfg.quantization!r}", f"the teacher {teacher} is a "
                                "text-to-image UNet, which becomes the editing base by copying its weights into a "
                                "widened UNet, and quantised weights cannot be copied so",
                                "set quantization=None for a UNet teacher, or use a DiT teacher (FLUX.1-Kontext)")
        self.model = to_device(editing_base(base), self.device)  # teacher = the shared base
        attach_lora(self.model, cfg.lora_rank, adapter_name="fake")
        attach_lora(self.model, cfg.lora_rank, adapter_name="generator")
        trainable_in_fp32(self.model)  # the adapters, made in the base's dtype
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, "NPEditConfig.gradient_checkpointing")
        self.pipe = EditPipeline(self.model, load_text_encoder(teacher, dtype=place.dtype, device=self.device),
                                 load_autoencoder(teacher, dtype=place.dtype, device=self.device), cfg.shift)
        self.judge = VLMJudge.from_pretrained(judge_path, quantization=place.quantization, dtype=place.dtype,
                                              device=self.device).freeze()
        self.reward = JudgeReward(self.judge, differentiable=True)
        self.sources, self.records = load_unpaired(dataset)
        self.noop_idx = [i for i, r in enumerate(self.records) if r.edit_type == "noop"]
        self.edit_idx = [i for i, r in enumerate(self.records) if r.edit_type != "noop"] or self.noop_idx

    def batch(self, step: int) -> UnpairedBatch:
        rng = np.random.default_rng([self.cfg.seed, step, 11, process_rank()])  # data position = step
        pick = [int(rng.choice(self.noop_idx)) if self.noop_idx and rng.random() < self.cfg.noop_share
                else int(rng.choice(self.edit_idx)) for _ in range(self.cfg.batch_size)]
        recs = [self.records[i] for i in pick]
        return UnpairedBatch(to_tensor(self.sources[pick]).to(self.device), [r.instruction for r in recs],
                             [r.caption_edited for r in recs], [r.edit_type for r in recs])

    def generate(self, batch: UnpairedBatch, gen: torch.Generator) -> torch.Tensor:
        cond = self.pipe.condition(batch.instructions, batch.sources)
        noise = self.pipe.noise_like_latents(len(batch.instructions), batch.sources.shape[-1], gen)
        velocity, sigmas = self.pipe.velocity_fn(cond), self.pipe.sigmas(self.cfg.sampling_steps)
        with active_adapter(self.model, "generator"):  # every generator call runs inside
            if self.cfg.variant == "no_unroll":  # the unrolling ablation: x0_hat = eps - G(eps, 1), one call
                return one_step_estimate(velocity, noise, sigmas, gradient_checkpointing=self.cfg.gradient_checkpointing)
            x0, _ = unroll_two_steps(velocity, noise, sigmas, gen, gradient_checkpointing=self.cfg.gradient_checkpointing)
        return x0

    def copy_step(self, batch: UnpairedBatch, step: int) -> dict[str, torch.Tensor]:
        """Reference-copy warm-up (NP-Edit, before the main stage): flow matching of the generator
        towards its own source under the batch's instructions. It reads no target image; it
        teaches an editor that starts as the teacher (a UNet's reference channels are zero) to
        look at the reference, so that the main stage starts from "copy" instead of "draw"."""
        gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 64 + 32 + process_rank())
        cond = self.pipe.condition(batch.instructions, batch.sources)
        loss = flow_matching_loss(self.adapter_fn(self.pipe.velocity_fn(cond), "generator"),
                                  self.pipe.autoencoder.encode(batch.sources), gen, uniform_t())
        out = {"loss": loss, "loss_copy": loss.detach()}
        if self.cfg.curve_every and step % self.cfg.curve_every == 0:
            out.update(self.curve_point(step))
        return out

    def step(self, batch: UnpairedBatch, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + process_rank())
        x0 = self.generate(batch, gen)
        images = self.pipe.autoencoder.decode(x0)
        logs: dict[str, Any] = {}
        g_vlm = g_dmd = torch.zeros_like(x0)
        if cfg.variant != "dmd_only":  # NP-Edit eq. VLM loss, gradient on x0 through the decoder
            temp = temperature_ramp(step, cfg.temperature_start, 1.0, cfg.temperature_steps)
            loss_vlm, stats = self.reward.npedit_loss(batch.sources, images, batch.instructions, batch.edit_types,
                                                      identity=cfg.variant != "no_identity",
                                                      full_vocab=cfg.variant == "full_vocab", temperature=temp)
            g_vlm = torch.autograd.grad(loss_vlm, x0, retain_graph=True)[0]
            logs.update(loss_vlm=loss_vlm.detach(), **stats)
        caption = self.pipe.condition(batch.captions_edited)
        if cfg.variant != "vlm_only":  # DMD: teacher (adapters off) vs fake adapter, on the edited caption
            real = self.adapter_fn(self.pipe.velocity_fn(caption), None)
            real_uncond = self.adapter_fn(self.pipe.velocity_fn(self.pipe.null_condition(caption)), None)
            fake = self.adapter_fn(self.pipe.velocity_fn(caption), "fake")
            loss_dmd, info = dmd_generator_loss(x0, real, fake, gen, guidance=cfg.guidance,
                                                real_uncond_velocity_fn=real_uncond)
            g_dmd = torch.autograd.grad(loss_dmd, x0, retain_graph=True)[0]
            logs.update(loss_dmd=loss_dmd.detach(), dmd_grad_norm=info["grad_norm"])
        norm_vlm, norm_dmd = g_vlm.norm(), g_dmd.norm()
        w_vlm = cfg.lambda_vlm
        if cfg.balance and cfg.variant not in ("dmd_only", "vlm_only"):  # match gradient sizes on x0
            w_vlm = cfg.lambda_vlm * (norm_dmd / norm_vlm.clamp_min(1e-12)).item()
        total = w_vlm * g_vlm + cfg.lambda_dmd * g_dmd
        noop = torch.tensor([t == "noop" for t in batch.edit_types], device=x0.device)[:, None, None, None]
        if noop.any():  # "do nothing" samples: gradient of the MSE to the source (NP-Edit, 1% of samples)
            target = self.pipe.autoencoder.encode(batch.sources)
            total = total + torch.where(noop, 2 * (x0 - target) / x0.numel(), 0.0).detach()
        surrogate = (x0 * total.detach()).sum()  # d surrogate / d x0 = the combined gradient
        self._update_fake(x0.detach(), caption, gen)
        logs.update(grad_vlm=norm_vlm, grad_dmd=norm_dmd, w_vlm=torch.tensor(w_vlm))
        if cfg.curve_every and step % cfg.curve_every == 0:
            logs.update(self.curve_point(step))
        return {"loss": surrogate, **logs}

    def adapter_fn(self, fn, adapter: str | None):
        """``fn`` evaluated with one adapter active (``None``: adapters off, i.e. the teacher).

        The adapter is switched at call time, because the DMD helpers call their score
        functions later, interleaved."""
        def call(x, t):
            with (adapters_disabled(self.model) if adapter is None else active_adapter(self.model, adapter)):
                return fn(x, t)
        return call

    def _update_fake(self, x0: torch.Tensor, caption, gen: torch.Generator) -> None:
        """The fake score's N_aux flow-matching updates on G's detached outputs (DMD2 TTUR)."""
        if self.cfg.variant == "vlm_only":
            return
        fn = self.adapter_fn(self.pipe.velocity_fn(caption), "fake")
        for _ in range(self.cfg.n_aux):
            self.fake_optimizer.zero_grad(set_to_none=True)
            fake_score_loss(fn, x0, gen).backward()
            self.fake_optimizer.step()

    @torch.no_grad()
    def curve_point(self, step: int) -> dict[str, float]:
        """Judge's and oracle's view of the generator on fixed held-out-from-training sources: the
        judge's "yes" to both questions, and the oracle's success, followed and preserved."""
        if not hasattr(self, "_curve"):
            rng = np.random.default_rng(1234)
            world_cfg = world.WorldConfig.from_dict(self.cfg.world)

            edits = [random_edit(world.sample_scene(rng, world_cfg), rng, world_cfg) for _ in range(self.cfg.n_curve)]
            self._curve = (edits, np.stack([world.render(e.source, world_cfg) for e in edits]), world_cfg)
        edits, sources, world_cfg = self._curve
        with active_adapter(self.model, "generator"):
            outputs = self.pipe.edit(sources, [e.instruction for e in edits], steps=self.cfg.sampling_steps, seed=99)
        judged = JudgeReward(self.judge)(to_tensor(sources), [e.instruction for e in edits], to_tensor(outputs),
                                         edit_types=[e.edit_type for e in edits])
        verdicts = [world.judge(s, e, o, world_cfg) for s, e, o in zip(sources, edits, outputs)]
        return {"curve_judge_yes": float(((judged["followed"] > 0.5) & (judged["preserved"] > 0.5)).float().mean()),
                **{f"curve_oracle_{k}": float(np.mean([getattr(v, k) for v in verdicts]))
                   for k in ("success", "followed", "preserved")}}

    def _loop(self, steps: int, lr: float | None = None) -> LoopConfig:
        cfg = self.cfg
        check_training_device(self.device, "NPEditTrainer")
        return LoopConfig(steps=steps, lr=lr or cfg.lr, betas=cfg.betas, optimizer=cfg.optimizer, grad_clip=cfg.grad_clip,
                          ema_decay=cfg.ema_decay, checkpoint_every=cfg.checkpoint_every,
                          mixed_precision=self.placement.mixed_precision, seed=cfg.seed)

    def fit(self, ckpt_dir: Path, progress: bool = True, warmup_dir: Path | None = None):
        """The copy warm-up (if any), then the main stage; returns both stages' history.

        The warm-up does not depend on the variant, so ablations can share it: pass the same
        ``warmup_dir`` (keyed by :func:`warmup_key`) and it trains once. Each stage checkpoints
        and resumes on its own; main-stage steps are numbered after the warm-up's.
        """
        cfg = self.cfg
        warm = cfg.copy_warmup_steps
        history = self.warm_up(warmup_dir or Path(ckpt_dir) / "copy_warmup", progress) if warm else []
        loop = self._loop(cfg.steps)
        main = make_optimizer(lora_parameters(self.model, "generator"), loop)
        self.fake_optimizer = make_optimizer(lora_parameters(self.model, "fake"), loop)
        stage = train(lambda batch, step: self.step(batch, warm + step), {"editor": self.model}, config=loop,
                      ckpt_dir=ckpt_dir, batch_fn=lambda step: self.batch(warm + step),
                      optimizers={"main": main}, aux_optimizers={"fake": self.fake_optimizer},
                      run_config=cfg.identity(), progress=progress)
        for record in stage:
            record["step"] += warm
        history += stage
        return history

    def warm_up(self, warmup_dir: Path, progress: bool = True) -> list[dict]:
        """The copy warm-up alone (``copy_warmup_steps`` of :meth:`copy_step`), checkpointed in
        ``warmup_dir``; a finished one is loaded, not retrained. After it the generator is the
        editor the main stage starts from (what the notebook scores as ``npedit.warmup``)."""
        cfg = self.cfg
        if not cfg.copy_warmup_steps:
            raise ValueError("warm_up: copy_warmup_steps is 0 in this config; set it to the warm-up's length.")
        loop = self._loop(cfg.copy_warmup_steps, cfg.copy_warmup_lr)
        return list(train(self.copy_step, {"editor": self.model}, config=loop, ckpt_dir=warmup_dir,
                          batch_fn=self.batch,
                          optimizers={"main": make_optimizer(lora_parameters(self.model, "generator"), loop)},
                          run_config=warmup_key(cfg), progress=progress))

    def edit_pipeline(self):
        """The trained generator as an EditPipeline (generator adapter active)."""

        set_active_adapter(self.model, "generator")
        return self.pipe

    def save_editor(self, folder: Path) -> Path:
        """The generator as a model folder in the hub layout (``load_pipeline(folder)`` and
        ``MTRLConfig(policy_id=folder)`` read it): its adapter merged into a copy of the base,
        saved with the teacher's text encoder and autoencoder. After :meth:`warm_up` this is the
        editor the main stage starts from, so another method can start from it too."""
        folder = Path(folder)
        partial = folder.with_name(folder.name + ".partial")  # a folder that exists is complete
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted save
        save_components(partial, merged_copy(self.model, "generator"), self.pipe.text_encoder, self.pipe.autoencoder)
        partial.rename(folder)
        return folder


def warmup_key(cfg: NPEditConfig) -> dict[str, Any]:
    """What the copy warm-up depends on (not the variant, nor the main stage's own settings)."""
    keep = ("teacher_id", "backbone", "seed", "batch_size", "lr", "betas", "optimizer", "lora_rank", "grad_clip",
            "ema_decay", "mixed_precision", "copy_warmup_steps", "copy_warmup_lr", "noop_share", "profile",
            "dtype", "quantization")
    return {"stage": "npedit_copy_warmup", **{k: v for k, v in cfg.identity().items() if k in keep}}


def shared_warmup_dir(cfg: NPEditConfig, data_root) -> Path:
    """The artifact-cache folder of the copy warm-up every variant of ``cfg`` on the data in
    ``data_root`` shares (notebook 05 trains it once; ``fit(..., warmup_dir=)`` finds it)."""

    return cache.checkpoint_dir("npedit", {**warmup_key(cfg), "data": str(data_root)})


def warmup_editor_dir(cfg: NPEditConfig, data_root) -> Path:
    """The artifact-cache folder of the editor after the copy warm-up as a model folder
    (:meth:`NPEditTrainer.save_editor`), keyed as the warm-up is: what Flow-GRPO starts from when
    it is compared with NP-Edit from the same initialisation."""

    return cache.checkpoint_dir("npedit_warmup_editor", {**warmup_key(cfg), "data": str(data_root)})


def train_npedit(cfg: NPEditConfig, dataset, ckpt_dir: Path, device: torch.device | str | None = None):
    """Train NP-Edit on an unpaired dataset; returns (pipeline of the trained editor, history).
    ``device`` None is the accelerator's device (CUDA when present, else CPU)."""
    torch.manual_seed(cfg.seed)
    trainer = NPEditTrainer(cfg, dataset, device)
    history = trainer.fit(ckpt_dir)
    return trainer.edit_pipeline(), history
