"""The one training loop every stage uses (pretraining, NP-Edit, Multi-Reward, MT-EditFlow).

A stage supplies ``step_fn(batch, step) -> {"loss": tensor, ...}``; the loop does the rest:
backward, gradient clipping, the optimizer and LR-scheduler steps, the EMA update, a guard
against NaN/Inf, mixed precision on GPUs, progress, logging, checkpoints, and resuming from the
newest checkpoint so that an interrupted run continues bit-for-bit where it stopped (on CPU).
Resuming skips a corrupt checkpoint for the newest intact one, and refuses a checkpoint made
with another stage configuration (``run_config``) unless ``allow_config_change=True``; see
:mod:`nb_edit.training.checkpoint` for what may change between a run and its resume.

Auxiliary models updated several times per step (NP-Edit's fake score, DMD2 section 4.1) run
their inner updates inside ``step_fn`` on ``aux_optimizers``, which the loop only checkpoints.

Data parallelism (``accelerate launch --num_processes N`` or ``torchrun``, after
``torch.distributed.init_process_group``): every process runs the same loop on its own shard of
the batch; the loop averages the gradients over the processes before clipping (and before every
step of an auxiliary optimizer), so all processes take the same update, as one process would on
the whole batch. Only process 0 writes checkpoints and shows progress (its history logs its own
shard's loss); all of them resume from the same checkpoint, with process 0's RNG state, so draw
per-sample randomness from generators seeded by step and sample when runs must match exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from nb_edit.core.runtime import set_seed
from nb_edit.training.checkpoint import latest_checkpoint, load_latest_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

StepFn = Callable[[Any, int], dict[str, torch.Tensor]]


class NonFiniteError(RuntimeError):
    """The loss or its gradient was NaN/Inf for ``max_nonfinite`` steps in a row."""

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


@dataclass
class LoopConfig:
    """Settings of the loop itself; a stage's config holds one of these (plain data)."""

    steps: int = 100
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    optimizer: str = "adamw8bit"  # "adamw8bit" (bitsandbytes, runs on CPU too) | "adamw"
    warmup_steps: int = 0  # linear LR warm-up, then constant (or cosine, see schedule)
    schedule: str = "constant"  # "constant" | "cosine" (half a cosine from lr down to 0 over the steps) | "wsd"
    decay_steps: int = 0  # "wsd" (warm-up, stable, decay): constant lr, then linear to 0 over the last decay_steps
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    ema_decay: float | None = None  # e.g. 0.999; None = no EMA
    checkpoint_every: int = 100
    keep_last: int = 2
    max_nonfinite: int = 5  # this many NaN/Inf steps in a row stop the run
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (GPU only, autocast)
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        checks = {"optimizer": self.optimizer in ("adamw8bit", "adamw"),
                  "mixed_precision": self.mixed_precision in ("no", "bf16", "fp16"),
                  "schedule": self.schedule in ("constant", "cosine", "wsd"),
                  "decay_steps": 0 <= self.decay_steps <= self.steps,
                  "steps": self.steps >= 0, "lr": self.lr > 0, "checkpoint_every": self.checkpoint_every > 0,
                  "max_nonfinite": self.max_nonfinite > 0, "warmup_steps": self.warmup_steps >= 0,
                  "ema_decay": self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
                  "grad_clip": self.grad_clip is None or self.grad_clip > 0}
        for name, good in checks.items():
            if not good:
                raise ValueError(f"LoopConfig.{name}={getattr(self, name)!r} is invalid; fix: see the "
                                 "comment on the field (optimizer adamw8bit|adamw, mixed_precision "
                                 "no|bf16|fp16, schedule constant|cosine|wsd, decay_steps within steps, positive sizes, ema_decay in (0, 1))")


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True unless this is a process other than 0 of a distributed run."""
    return _world_size() == 1 or torch.distributed.get_rank() == 0


def all_reduce_gradients(params) -> None:
    """Average ``.grad`` over the processes of a distributed run (a no-op in one process).

    Each process computed the gradient of the mean loss on its shard; with equal shards their
    average is the gradient of the mean loss on the whole batch. A parameter that got no
    gradient in some processes counts as zero there; one with none anywhere keeps ``None``.
    """
    world = _world_size()
    if world == 1:
        return
    params = list(params)
    if not params:
        return
    # on the parameters' device: NCCL (GPU runs) reduces CUDA tensors only
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    torch.distributed.all_reduce(has_grad)  # every process must send the same tensors
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p, anywhere in zip(params, has_grad.tolist()):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():  # one collective per device and dtype, not one per tensor
        flat = torch.cat([g.reshape(-1) for g in grads]) / world
        torch.distributed.all_reduce(flat)
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))


def _average_before_step(optimizer: torch.optim.Optimizer) -> None:
    """Make an auxiliary optimizer average its gradients over the processes before each step."""
    if not getattr(optimizer, "_nb_edit_averages_gradients", False):  # once, even when train() is re-entered
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: all_reduce_gradients(p for g in opt.param_groups for p in g["params"]))
        optimizer._nb_edit_averages_gradients = True


def _all_processes(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over the processes, so that all of them skip (or take) a step together."""
    if _world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def make_optimizer(params, config: LoopConfig) -> torch.optim.Optimizer:
    """AdamW from bitsandbytes (8-bit states for tensors of >= 4096 elements) or from torch."""
    kwargs = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        import bitsandbytes  # slow to import, so only when asked for

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, config: LoopConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_steps``, then the constant ``lr``, diffusers' cosine decay, or
    "wsd": constant, then linear to 0 over the last ``decay_steps``. A "wsd" run computes exactly
    what a "constant" run of the same lr computed up to ``steps - decay_steps``, so a constant-lr
    stage can be lengthened and annealed by resuming its last checkpoint."""
    warmup = config.warmup_steps
    if config.schedule == "cosine":
        from diffusers.optimization import get_cosine_schedule_with_warmup

        return get_cosine_schedule_with_warmup(optimizer, warmup, max(config.steps, warmup + 1))
    decay_from = config.steps - config.decay_steps if config.schedule == "wsd" else None

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if decay_from is not None and step >= decay_from:
            scale *= max(0.0, (config.steps - step) / max(1, config.decay_steps))
        return scale

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of trainable parameters: ema <- decay * ema + (1 - decay) * p.

    Kept per module by parameter name (so it saves as safetensors) and in float32 (a bf16
    average cannot move by (1 - decay) * difference). Only parameters that train are tracked:
    a frozen base under LoRA is never copied.
    """

    def __init__(self, params: dict[str, dict[str, torch.nn.Parameter]], decay: float):
        self.decay, self.params = decay, params
        self.shadow = {m: {n: p.detach().float().clone() for n, p in ps.items()} for m, ps in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for module, named in self.params.items():
            for name, param in named.items():
                self.shadow[module][name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def load(self, shadow: dict[str, dict[str, torch.Tensor]]) -> None:
        for module, named in self.shadow.items():
            for name, tensor in named.items():
                tensor.copy_(shadow[module][name])

    @contextmanager
    def applied(self):
        """Swap the averaged weights into the modules (for evaluation), then restore."""
        saved = {m: {n: p.detach().clone() for n, p in ps.items()} for m, ps in self.params.items()}
        self._copy_into(self.shadow)
        try:
            yield
        finally:
            self._copy_into(saved)

    @torch.no_grad()
    def _copy_into(self, source) -> None:
        for module, named in self.params.items():
            for name, param in named.items():
                param.copy_(source[module][name])


class History(list):
    """Per-step records (dicts of floats); ``.ema`` and ``.checkpoint`` give the run's EMA
    (or None) and its final checkpoint folder."""

    ema: EMA | None = None
    checkpoint: Path | None = None


def _as_float(value) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def train(step_fn: StepFn, modules: dict[str, torch.nn.Module], *, config: LoopConfig,
          ckpt_dir: str | Path, batch_fn, optimizers: dict[str, torch.optim.Optimizer] | None = None,
          aux_optimizers: dict[str, torch.optim.Optimizer] | None = None,
          log_fn: Callable[[int, dict[str, float]], None] | None = None,
          run_config: dict | None = None, resume: bool = True, progress: bool = True,
          allow_config_change: bool = False) -> History:
    """Run ``config.steps`` steps of ``step_fn`` and return the full history (resumed runs included).

    ``batch_fn`` is ``batch_fn(step) -> batch`` (the data position is the step) or an iterator
    with ``state_dict()``/``load_state_dict()`` (its state is checkpointed). Without
    ``optimizers`` one optimizer (``make_optimizer``) takes every trainable parameter of
    ``modules``. The loop sets no train/eval mode: the stage owns that.

    ``run_config`` is the stage's configuration: saved with every checkpoint, and compared with
    the one a resumed checkpoint was made with; a change other than the stage's length, cadence
    or placement raises ``BadInputError`` naming the fields, unless ``allow_config_change=True``
    (then it warns). A corrupt newest checkpoint is skipped for the newest intact one.
    """
    cfg, ckpt_dir = config, Path(ckpt_dir)
    if not modules:
        raise ValueError("train(modules={}): no module to train; pass e.g. {'editor': editor}")
    device = next((p.device for m in modules.values() for p in m.parameters()), torch.device("cpu"))
    if cfg.mixed_precision != "no" and device.type != "cuda":
        raise ValueError(f"LoopConfig.mixed_precision={cfg.mixed_precision!r} needs a CUDA device but the "
                         f"modules are on {device}; use mixed_precision='no' on CPU")
    set_seed(cfg.seed)
    if optimizers is None:
        trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        optimizers = {"main": make_optimizer(trainable, cfg)}
    aux_optimizers = aux_optimizers or {}
    for opt in aux_optimizers.values():
        _average_before_step(opt)
    params = [p for opt in optimizers.values() for group in opt.param_groups for p in group["params"]]
    if not params:
        raise ValueError("train(): the optimizers hold no parameters; check requires_grad on the modules")
    schedulers = {name: make_scheduler(opt, cfg) for name, opt in optimizers.items()}
    optimized = {id(p) for p in params}
    ema = None
    if cfg.ema_decay is not None:
        ema = EMA({m: {n: p for n, p in mod.named_parameters() if id(p) in optimized}
                   for m, mod in modules.items()}, cfg.ema_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16)
                if cfg.mixed_precision != "no" else nullcontext())
    sampler = batch_fn if hasattr(batch_fn, "state_dict") else None

    history, start, nonfinite_total, streak = History(), 0, 0, 0
    last_good = latest_checkpoint(ckpt_dir)
    if last_good is not None and not resume:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints (newest {last_good.name}) and resume=False; "
                              "pass resume=True to continue that run, or another ckpt_dir to start over")
    # only process 0 renames corrupt checkpoints, so the others never race it
    found = (load_latest_checkpoint(ckpt_dir, modules, stage_config=run_config, allow_config_change=allow_config_change,
                                    set_aside=is_main_process()) if last_good is not None else None)
    last_good = found[0] if found is not None else None
    if found is not None:
        state = found[1]
        saved_loop = {k: v for k, v in state["config"].get("loop", {}).items() if k != "steps"}
        changed = sorted(k for k, v in json.loads(json.dumps(asdict(cfg))).items() if k in saved_loop and saved_loop[k] != v)
        if (changed and set(changed) <= {"decay_steps", "schedule"} and saved_loop.get("schedule") == "constant"
                and cfg.schedule == "wsd"
                and state["step"] <= cfg.steps - cfg.decay_steps):
            changed = []  # a constant run extended and annealed: "wsd" computed the same steps so far
        if changed:
            log.warning("resuming %s with changed loop settings %s; the result will differ from an "
                        "uninterrupted run", last_good, changed)
        for store, saved in ((optimizers, state["optimizers"]), (aux_optimizers, state["aux_optimizers"]),
                             (schedulers, state["schedulers"])):
            if set(store) != set(saved):
                raise KeyError(f"{last_good}: checkpoint holds {sorted(saved)} but this run has {sorted(store)}; "
                               "pass the same optimizer names, or resume=False to start over")
            for name, obj in store.items():
                obj.load_state_dict(saved[name])
        if ema is not None and state["ema"]:
            ema.load(state["ema"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if sampler is not None:
            sampler.load_state_dict(state["data"])
        history.extend(state["history"])
        start, nonfinite_total = state["step"], state["nonfinite_total"]
        log.info("resumed from %s (step %d)", last_good, start)

    def checkpoint(completed: int) -> Path:
        if not is_main_process():  # process 0 writes; the others wait for it, then see the same folder
            torch.distributed.barrier()
            return latest_checkpoint(ckpt_dir)
        state = {"optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                 "aux_optimizers": {n: o.state_dict() for n, o in aux_optimizers.items()},
                 "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "data": sampler.state_dict() if sampler is not None else {"next_step": completed},
                 "history": list(history), "nonfinite_total": nonfinite_total}
        path = save_checkpoint(ckpt_dir, completed, modules=modules, state=state,
                               ema=ema.shadow if ema is not None else None, keep_last=cfg.keep_last,
                               config={"loop": asdict(cfg), "run": run_config}, stage_config=run_config)
        if _world_size() > 1:
            torch.distributed.barrier()
        return path

    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not progress or not is_main_process(),
               dynamic_ncols=True)
    for step in range(start, cfg.steps):
        tick = time.perf_counter()
        batch = next(sampler) if sampler is not None else batch_fn(step)
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        with autocast:
            out = step_fn(batch, step)
        if not isinstance(out, dict) or not isinstance(out.get("loss"), torch.Tensor) or out["loss"].numel() != 1:
            raise TypeError(f"step_fn returned {type(out).__name__} at step {step}; it must return a dict "
                            "with a scalar tensor under 'loss' (and other values to log)")
        loss = out["loss"]
        record = {"step": float(step), **{k: _as_float(v) for k, v in out.items()}}
        finite = _all_processes(bool(torch.isfinite(loss.detach())), loss.device)
        overflow_only = unscaled = False
        if finite:
            (scaler.scale(loss) if scaler is not None else loss).backward()
            all_reduce_gradients(params)  # data parallelism: the gradient of the whole batch
            for opt in optimizers.values() if scaler is not None else ():
                scaler.unscale_(opt)
                unscaled = True
            if cfg.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            record["grad_norm"] = float(grad_norm)
            finite = math.isfinite(record["grad_norm"])
            # fp16 overflow while GradScaler calibrates is expected; only count it once unscaled
            # gradients overflow too (scale < 1)
            overflow_only = not finite and scaler is not None and scaler.get_scale() >= 1.0
        if finite:
            for name, opt in optimizers.items():
                scaler.step(opt) if scaler is not None else opt.step()
                schedulers[name].step()
            if ema is not None:
                ema.update()
            streak = 0
        else:
            for opt in optimizers.values():
                opt.zero_grad(set_to_none=True)
            nonfinite_total += 1
            streak += 0 if overflow_only else 1
            what = ("fp16 gradient overflow (GradScaler lowers its scale)" if overflow_only
                    else "non-finite " + ("gradient" if torch.isfinite(loss.detach()) else "loss"))
            log.warning("step %d: %s, step skipped (%d in a row, %d in all)", step, what, streak, nonfinite_total)
        if unscaled:  # GradScaler.update needs the inf checks that unscale_ records
            scaler.update()
        record.update(skipped=float(not finite), nonfinite_total=float(nonfinite_total),
                      lr=float(next(iter(schedulers.values())).get_last_lr()[0]),
                      step_s=time.perf_counter() - tick)  # wall time of this step, batch included
        history.append(record)
        if log_fn is not None:
            log_fn(step, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        if streak >= cfg.max_nonfinite:
            bar.close()
            where = (f"the last good checkpoint {last_good} is intact; resume from it" if last_good is not None
                     else f"no checkpoint was written yet (checkpoint_every={cfg.checkpoint_every})")
            raise NonFiniteError(
                f"step {step}: loss or gradient was NaN/Inf for {streak} steps in a row (steps "
                f"{step - streak + 1}..{step}); none of them updated the weights and {where}. Fix: lower "
                "lr, set grad_clip, or check the data and step_fn at those steps", step, last_good)
        completed = step + 1
        # no checkpoint in the middle of a non-finite streak: the newest one stays a good one
        if (completed % cfg.checkpoint_every == 0 and streak == 0) or completed == cfg.steps:
            last_good = checkpoint(completed)
    bar.close()
    history.ema, history.checkpoint = ema, last_good
    return history
