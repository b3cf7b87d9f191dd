"""The one training loop every stage uses (pretraining, NP-Edit, Multi-Reward, MT-EditFlow).

A stage supplies ``step_fn(batch, step) -> {"loss": tensor, ...}``; the loop does the rest:
backward, gradient clipping, the optimizer and LR-scheduler steps, the EMA update, a guard
against NaN/Inf, progress, logging, checkpoints, and resuming from the newest checkpoint so that
an interrupted run continues bit-for-bit where it stopped (on CPU). Resuming skips a corrupt
checkpoint for the newest intact one, and refuses a checkpoint made with another stage
configuration (``run_config``) unless ``allow_config_change=True``; see
:mod:`nb_edit.training.checkpoint` for what may change between a run and its resume.

``accelerate`` owns the device, the mixed precision and the processes: each run makes one
``Accelerator`` (:func:`make_accelerator`) on the process's device (``core.runtime``: CUDA when
present, else CPU). The loop moves the modules and the batch there (a trainer builds its modules
there in the first place), runs ``step_fn`` under ``accelerator.autocast()``, back-propagates
with ``accelerator.backward`` (fp16 loss scaling with accelerate's scaler; the loss divided by
the gradient-accumulation steps) and clips with ``accelerator.clip_grad_norm_``.
``LoopConfig.mixed_precision`` other than "no" needs CUDA here; the stage configs resolve theirs
first (fp32 on CPU with a warning, ``core.runtime.resolve_mixed_precision``).

Gradient accumulation (``gradient_accumulation_steps=k``): one optimizer step runs ``step_fn``
on k micro-batches, ``batch_fn`` and ``step_fn`` seeing micro-batch indices ``step * k + i``
(with k = 1, the default, the index is the step); the history keeps one record per optimizer
step with each value averaged over its micro-batches.

Auxiliary models updated several times per step (NP-Edit's fake score, DMD2 section 4.1) run
their inner updates inside ``step_fn`` on ``aux_optimizers``, which the loop only checkpoints.

Data parallelism (``accelerate launch --num_processes N`` or ``torchrun``): every process runs
the same loop on its own shard of the batch, and the gradients are averaged over the processes
with accelerate's ``reduce`` before clipping (and before every step of an auxiliary optimizer),
so all processes take the same update, as one process would on the whole batch. The models are
not wrapped in ``DistributedDataParallel``: the stages call them several times per step (the
unrolled generator, teacher and fake score as LoRA adapters of one base, inner updates of an
auxiliary model, rollouts), outside any wrapper and with ``autograd.grad`` in between, which
DDP's one-forward-one-backward contract does not allow; one averaging of the gradients after
backward computes what DDP would. Only process 0 writes checkpoints and shows progress (its
history logs its own shard's loss); all of them resume from the same checkpoint, with process
0's RNG state, so draw per-sample randomness from generators seeded by step and sample when runs
must match exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import reduce, send_to_device
from tqdm.auto import tqdm

from nb_edit.core.runtime import is_quantized, process_state, same_device, set_seed
from nb_edit.core.validation import BadInputError
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
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16": accelerate's autocast (CUDA only, see the docstring)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (module docstring)
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        checks = {"optimizer": self.optimizer in ("adamw8bit", "adamw"),
                  "mixed_precision": self.mixed_precision in ("no", "bf16", "fp16"),
                  "schedule": self.schedule in ("constant", "cosine", "wsd"),
                  "decay_steps": 0 <= self.decay_steps <= self.steps,
                  "steps": self.steps >= 0, "lr": self.lr > 0, "checkpoint_every": self.checkpoint_every > 0,
                  "max_nonfinite": self.max_nonfinite > 0, "warmup_steps": self.warmup_steps >= 0,
                  "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
                  "ema_decay": self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
                  "grad_clip": self.grad_clip is None or self.grad_clip > 0}
        for name, good in checks.items():
            if not good:
                raise ValueError(f"LoopConfig.{name}={getattr(self, name)!r} is invalid; fix: see the "
                                 "comment on the field (optimizer adamw8bit|adamw, mixed_precision "
                                 "no|bf16|fp16, schedule constant|cosine|wsd, decay_steps within steps, positive sizes, ema_decay in (0, 1))")


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1) -> Accelerator:
    """A fresh ``Accelerator`` for one training run, on the process's device (``core.runtime``).

    Fresh, so that its fp16 loss scaler starts anew with each run (and resumes from the run's
    checkpoint). accelerate keeps one mixed-precision setting per process; a run asking for
    another one than the previous run of the process (a notebook kernel that trains a tiny stage
    after a bf16 one) starts that setting over with accelerate's own reset, which keeps the
    process group and the device.
    """
    state = process_state()
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state()  # reset_partial_state=False: the processes and device stay
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=state.device.type == "cpu",
                              gradient_accumulation_steps=gradient_accumulation_steps)
    # the run's config decides, also over accelerate launch's --gradient_accumulation_steps: it
    # is what the checkpoints record and what the data positions count
    accelerator.gradient_accumulation_steps = gradient_accumulation_steps
    return accelerator


def is_main_process() -> bool:
    """True unless this is a process other than 0 of a distributed run."""
    return process_state().is_main_process


def average_gradients(params) -> None:
    """Average ``.grad`` over the processes of a distributed run (a no-op in one process).

    Each process computed the gradient of the mean loss on its shard; with equal shards their
    average is the gradient of the mean loss on the whole batch. A parameter that got no
    gradient in some processes counts as zero there; one with none anywhere keeps ``None``
    (so AdamW leaves it alone, as in one process).
    """
    state = process_state()
    if state.num_processes == 1:
        return
    params = list(params)
    if not params:
        return
    # on the parameters' device: NCCL (GPU runs) reduces CUDA tensors only
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    has_grad = reduce(has_grad, "sum")  # every process must send the same tensors
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p, anywhere in zip(params, has_grad.tolist()):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in buckets.values():  # one collective per device and dtype, not one per tensor
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))


def _average_before_step(optimizer: torch.optim.Optimizer) -> None:
    """Make an auxiliary optimizer average its gradients over the processes before each step."""
    if not getattr(optimizer, "_nb_edit_averages_gradients", False):  # once, even when train() is re-entered
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: average_gradients(p for g in opt.param_groups for p in g["params"]))
        optimizer._nb_edit_averages_gradients = True


def _all_processes(flag: bool, device: torch.device) -> bool:
    """``flag`` and-ed over the processes, so that all of them skip (or take) a step together."""
    if process_state().num_processes == 1:
        return flag
    return int(reduce(torch.tensor([int(not flag)], device=device), "sum").item()) == 0


def place_modules(modules: dict[str, torch.nn.Module], device: torch.device) -> None:
    """Device placement: modules with a weight elsewhere are moved to ``device``. A quantised
    module cannot move (bitsandbytes places its weights at load time): load it there instead."""
    for name, module in modules.items():
        tensors = [*module.parameters(), *module.buffers()]
        elsewhere = sorted({str(t.device) for t in tensors if not same_device(t.device, device)})
        if not elsewhere:
            continue
        if is_quantized(module):
            raise BadInputError(f"train(modules={{{name!r}: ...}})", f"the quantised module is on {', '.join(elsewhere)} "
                                f"but the accelerator's device is {device}",
                                f"load it with device={str(device)!r} (the trainers do, with device=None)")
        module.to(device)


def check_training_device(device: torch.device, who: str) -> None:
    """Refuse to train a stage whose modules were built on another device than the accelerator's
    (the loop would move the trained module but not the stage's judge or text encoder)."""
    accelerator_device = process_state().device
    if not same_device(device, accelerator_device):
        raise BadInputError(f"{who}(device={str(device)!r})", f"training runs on the accelerator's device "
                            f"{accelerator_device}", "build it with device=None (the accelerator's device)")


def enable_gradient_checkpointing(editor: torch.nn.Module, field: str = "gradient_checkpointing") -> bool:
    """Turn on activation recomputation in ``editor``'s backbone (diffusers models have it);
    warn naming ``field`` and go on without it where the backbone has none."""
    backbone = getattr(editor, "backbone", editor)
    if getattr(backbone, "_supports_gradient_checkpointing", False) and hasattr(editor, "enable_gradient_checkpointing"):
        editor.enable_gradient_checkpointing()
        return True
    warnings.warn(f"{field}=True but {type(backbone).__name__} has no gradient checkpointing; training without it "
                  "(more activation memory)", UserWarning, stacklevel=2)
    return False


def make_optimizer(params, config: LoopConfig) -> torch.optim.Optimizer:
    """AdamW from bitsandbytes (8-bit states for tensors of >= 4096 elements) or from torch."""
    kwargs = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        import bitsandbytes  # lazy: slow to import, and only the 8-bit optimizer needs it

        return bitsandbytes.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, config: LoopConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_steps``, then the constant ``lr``, diffusers' cosine decay, or
    "wsd": constant, then linear to 0 over the last ``decay_steps``. A "wsd" run computes exactly
    what a "constant" run of the same lr computed up to ``steps - decay_steps``, so a constant-lr
    stage can be lengthened and annealed by resuming its last checkpoint."""
    warmup = config.warmup_steps
    if config.schedule == "cosine":
        from diffusers.optimization import get_cosine_schedule_with_warmup  # lazy: diffusers is slow to import

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


def _mean_records(records: list[dict[str, float]]) -> dict[str, float]:
    """Each value averaged over the micro-batches that logged it (one record: itself)."""
    if len(records) == 1:
        return dict(records[0])
    keys = dict.fromkeys(k for r in records for k in r)
    return {k: math.fsum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}


def train(step_fn: StepFn, modules: dict[str, torch.nn.Module], *, config: LoopConfig,
          ckpt_dir: str | Path, batch_fn, optimizers: dict[str, torch.optim.Optimizer] | None = None,
          aux_optimizers: dict[str, torch.optim.Optimizer] | None = None,
          log_fn: Callable[[int, dict[str, float]], None] | None = None,
          run_config: dict | None = None, resume: bool = True, progress: bool = True,
          allow_config_change: bool = False) -> History:
    """Run ``config.steps`` steps of ``step_fn`` and return the full history (resumed runs included).

    ``batch_fn`` is ``batch_fn(step) -> batch`` (the data position is the step, or the
    micro-batch index with gradient accumulation) or an iterator with
    ``state_dict()``/``load_state_dict()`` (its state is checkpointed). Batches (tensors, and
    lists, tuples and dicts of them) are moved to the accelerator's device, and so are the
    ``modules``. Without ``optimizers`` one optimizer (``make_optimizer``) takes every trainable
    parameter of ``modules``. The loop sets no train/eval mode: the stage owns that.

    ``run_config`` is the stage's configuration: saved with every checkpoint, and compared with
    the one a resumed checkpoint was made with; a change other than the stage's length, cadence
    or placement raises ``BadInputError`` naming the fields, unless ``allow_config_change=True``
    (then it warns). A corrupt newest checkpoint is skipped for the newest intact one.
    """
    cfg, ckpt_dir = config, Path(ckpt_dir)
    if not modules:
        raise ValueError("train(modules={}): no module to train; pass e.g. {'editor': editor}")
    device = process_state().device  # the accelerator's device
    if cfg.mixed_precision != "no" and device.type != "cuda":
        raise BadInputError(f"LoopConfig.mixed_precision={cfg.mixed_precision!r}",
                            f"it needs a CUDA device but the accelerator's device is {device}",
                            "use mixed_precision='no' on CPU (the stage configs fall back to it by themselves)")
    accelerator = make_accelerator(cfg.mixed_precision, cfg.gradient_accumulation_steps)
    place_modules(modules, device)
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
    scaler = accelerator.scaler  # fp16 only: accelerate's GradScaler, None otherwise
    sampler = batch_fn if hasattr(batch_fn, "state_dict") else None
    micro_steps = cfg.gradient_accumulation_steps

    history, start, nonfinite_total, streak = History(), 0, 0, 0
    last_good = latest_checkpoint(ckpt_dir)
    if last_good is not None and not resume:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints (newest {last_good.name}) and resume=False; "
                              "pass resume=True to continue that run, or another ckpt_dir to start over")
    # only process 0 renames corrupt checkpoints, so the others never race it
    found = (load_latest_checkpoint(ckpt_dir, modules, stage_config=run_config, allow_config_change=allow_config_change,
                                    set_aside=accelerator.is_main_process) if last_good is not None else None)
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
        if not accelerator.is_main_process:  # process 0 writes; the others wait for it, then see the same folder
            accelerator.wait_for_everyone()
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
        accelerator.wait_for_everyone()  # a no-op in one process
        return path

    bar = tqdm(total=cfg.steps, initial=start, desc="train",
               disable=not progress or not accelerator.is_main_process, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        tick = time.perf_counter()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        micro_records: list[dict[str, float]] = []
        loss_finite = True
        for micro in range(micro_steps):
            index = step * micro_steps + micro  # the data position: the step itself without accumulation
            batch = send_to_device(next(sampler) if sampler is not None else batch_fn(index), device)
            with accelerator.autocast():
                out = step_fn(batch, index)
            if (not isinstance(out, dict) or not isinstance(out.get("loss"), torch.Tensor)
                    or out["loss"].numel() != 1):
                raise TypeError(f"step_fn returned {type(out).__name__} at step {index}; it must return a dict "
                                "with a scalar tensor under 'loss' (and other values to log)")
            loss = out["loss"]
            micro_records.append({k: _as_float(v) for k, v in out.items()})
            this_finite = _all_processes(bool(torch.isfinite(loss.detach())), device)
            if loss_finite and this_finite:  # after a non-finite loss the step is skipped anyway
                accelerator.backward(loss)  # / micro_steps; scaled when fp16
            loss_finite = loss_finite and this_finite
        record = {"step": float(step), **_mean_records(micro_records)}
        finite = loss_finite
        overflow_only = unscaled = False
        if finite:
            average_gradients(params)  # data parallelism: the gradient of the whole batch
            if scaler is not None:
                accelerator.unscale_gradients(list(optimizers.values()))
                unscaled = True
            if cfg.grad_clip is not None:
                grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
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
                    else "non-finite " + ("gradient" if loss_finite else "loss"))
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
