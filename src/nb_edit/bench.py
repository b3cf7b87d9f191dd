"""Benchmarks against the plain way, both measured in the same run (notebook 09, ``python -m nb_edit bench``).

Each figure is the median of ``repeats`` timed calls after ``warmup`` untimed ones, beside the
same work done the plain way on the same models and inputs, and their ratio:

* **NP-Edit training step** (``methods.npedit.train.NPEditTrainer.step`` plus backward, clipping and
  the optimizer step, as ``loop.train`` runs it): one frozen base with two LoRA adapters
  (generator, fake score; the teacher is the base with adapters off) and 8-bit AdamW, against
  :class:`FullCopiesNPEditTrainer`: the same step (same losses, same code) on three separate
  full copies of the teacher, generator and fake score fully fine-tuned with fp32 ``torch``
  AdamW: what DMD-style training does without adapters. Time per step and peak memory.
* **Judge**: teacher-forced yes/no logits (``VLMJudge.yes_no_logits``, one forward) against
  generate-and-parse (``VLMJudge.generate_score``) on the same judge, images and questions;
  generation with the key/value cache against generation without it; several questions about
  the same image pair with the image prefix run once (``yes_no_logits_multi(reuse_prefix=True)``)
  against one full sequence per question. Answers per second.
* **Rollout sampling**: ``EditPipeline.edit`` on a batch against one image at a time. Images/s.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU. On CPU it is counted the same way:
every tensor the step's models and optimizers hold (weights, buffers, gradients, optimizer
states) plus the peak of the tensors allocated during one step, read from the profiler's
allocation events (the process's RSS would hide it: the C allocator keeps freed memory).

Every ``*.speedup`` is "times better than the baseline": baseline time / time, throughput /
baseline throughput, baseline memory / memory. The CPU benchmarks use randomly initialised
models at the tiny profile's sizes (cost does not depend on the weights), written to a
temporary folder in the hub layout so that the stages load them as they load the stand-ins.

``run_gpu_benchmarks`` repeats the DiT step and the judge at real architecture sizes with random
weights (a FLUX.1-Kontext-sized DiT: 19 double + 38 single blocks, 24 heads x 128, 4-bit NF4
frozen base through diffusers' ``BitsAndBytesConfig``, LoRA, 8-bit AdamW, gradient
checkpointing; a LLaVA-1.5-7B-sized judge in bf16) and reports model-FLOPs utilisation against
the card's dense bf16 peak. It returns nothing without CUDA.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from nb_edit import world
from nb_edit.core import paths
from nb_edit.core.config import RunSettings
from nb_edit.core.images import to_tensor
from nb_edit.core.validation import SkipCounter
from nb_edit.data.judge_qa import random_edit
from nb_edit.data.world_datasets import shapesworld
from nb_edit.flow.losses import flow_matching_loss
from nb_edit.flow.pipeline import load_pipeline
from nb_edit.flow.sampling import unroll_two_steps
from nb_edit.methods import registry
from nb_edit.methods.npedit.train import NPEditConfig, NPEditTrainer
from nb_edit.models.editors import editing_base
from nb_edit.models.loaders import load_editor, save_components
from nb_edit.models.lora import attach_lora, lora_parameters
from nb_edit.models.text import build_tiny_text_encoder
from nb_edit.models.vlm import questions
from nb_edit.models.vlm.judge import LLAVA_IMAGE_TOKEN, VLMJudge
from nb_edit.models.vlm.parsing import parse_yes_no
from nb_edit.standins import hub_layout
from nb_edit.standins.editors import PretrainConfig, build_teacher, world_tokenizer
from nb_edit.standins.hub_layout import FLUX_LATENT_CHANNELS, KONTEXT_DIT_CONFIG
from nb_edit.standins.judge import JudgeConfig, judge_tokenizer
from nb_edit.training.loop import LoopConfig, make_optimizer

MB = 2**20


# ------------------------------------------------------------------------------------ measuring
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats}, warmup={warmup}: need repeats >= 1 and warmup >= 0.")
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def held_tensor_bytes(*holders: nn.Module | torch.optim.Optimizer | None) -> int:
    """Bytes of the distinct tensors held by modules (weights, buffers, gradients) and optimizers."""
    seen: set[int] = set()
    total = 0

    def count(tensor: torch.Tensor) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:  # shared storage (a base shared by roles) counts once
                seen.add(key)
                total += tensor.untyped_storage().nbytes()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            count(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for holder in holders:
        if isinstance(holder, nn.Module):
            for tensor in itertools.chain(holder.parameters(), holder.buffers()):
                count(tensor)
                if tensor.grad is not None:
                    count(tensor.grad)
        elif isinstance(holder, torch.optim.Optimizer):
            walk(list(holder.state.values()))
    return total


def _profiled_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) on CPU while ``fn()`` runs, from allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def peak_memory_mb(fn: Callable[[], Any], holders: list, device: torch.device) -> float:
    """Peak memory of one call of ``fn`` with everything ``holders`` keep resident (see module doc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) / MB
    resident = held_tensor_bytes(*holders)
    return (resident + _profiled_peak_bytes(fn)) / MB


def compare(key: str, value: float, baseline: float, higher_is_better: bool) -> dict[str, float]:
    """``key``, ``key.baseline`` and ``key.speedup`` (how many times better than the baseline)."""
    speedup = value / baseline if higher_is_better else baseline / value
    return {key: value, f"{key}.baseline": baseline, f"{key}.speedup": speedup}


def device_info(device: torch.device) -> dict[str, str]:
    """What the numbers were measured on (strings; kept apart from the numeric metrics)."""
    info = {"device": str(device), "torch": torch.__version__, "torch_threads": str(torch.get_num_threads()),
            "machine": platform.machine(), "python": platform.python_version()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.exists() else []
        info["name"] = names[0] if names else platform.processor() or "cpu"
        info["cpu_count"] = str(len(names) or "unknown")
    return info


# ------------------------------------------------------------------------------------ stand-ins
def make_random_standins(root: Path, seed: int = 0) -> dict[str, Path]:
    """A random teacher (the tiny profile's backbone + text encoder) and judge at the tiny profile's sizes,
    in the hub layout."""

    world_cfg = world.WorldConfig()
    torch.manual_seed(seed)
    shipped = PretrainConfig()  # the tiny profile's teacher
    teacher = build_teacher(shipped.backbone, world_cfg.resolution, shipped.unet_blocks)
    save_components(root / "teacher", editor=teacher, text_encoder=build_tiny_text_encoder(world_tokenizer(world_cfg)))
    sizes = JudgeConfig()  # the tiny profile's judge (not for_profile: the smoke override must not shrink it)
    judge = VLMJudge.tiny(sizes.family, judge_tokenizer(world_cfg), image_size=world_cfg.resolution, seed=seed,
                          vision_layers=sizes.vision_layers, text_layers=sizes.text_layers, hidden=sizes.hidden)
    judge.save_pretrained(root / "judge")
    return {"teacher": root / "teacher", "judge": root / "judge"}


class UnpairedEdits:
    """Random ShapesWorld edits with what NP-Edit reads of a curated set (sources, no targets)."""

    n_paired = 0

    def __init__(self, n: int, seed: int = 0, cfg: world.WorldConfig | None = None):

        self.cfg = cfg or world.WorldConfig()
        rng = np.random.default_rng(seed)
        self.edits = [random_edit(world.sample_scene(rng, self.cfg), rng, self.cfg) for _ in range(n)]
        self.sources = np.stack([world.render(e.source, self.cfg) for e in self.edits])
        self.counter = SkipCounter(name="bench edits")  # where a dataset counts its bad samples

    def __len__(self) -> int:
        return len(self.edits)

    def __iter__(self):
        return iter(self.edits)  # a world.Edit has the record fields NP-Edit reads

    def load(self, index: int) -> dict[str, Any]:
        return {"source": self.sources[index]}


# ------------------------------------------------------------------------------------ NP-Edit step
class _Roles(nn.Module):
    """Three full editors behind one forward; ``playing(role)`` picks which one answers."""

    def __init__(self, **editors: nn.Module):
        super().__init__()
        self.editors = nn.ModuleDict(editors)
        self.role = "generator"

    @contextmanager
    def playing(self, role: str):
        previous, self.role = self.role, role
        try:
            yield
        finally:
            self.role = previous

    def forward(self, *args, **kwargs):
        return self.editors[self.role](*args, **kwargs)


class FullCopiesNPEditTrainer(NPEditTrainer):
    """The NP-Edit step without adapters: separate full teacher, generator and fake-score models.

    The losses are the parent's own code; only the roles' models change (adapter switches become
    model switches), so the two trainers do the same math on different parameterisations.
    """

    def __init__(self, cfg: NPEditConfig, dataset, device: torch.device | None = None):
        super().__init__(cfg, dataset, device)
        teacher = Path(cfg.teacher_id) if cfg.teacher_id else paths.pretrained_dir() / "teacher"  # as the parent
        copies = {role: editing_base(load_editor(teacher, cfg.backbone)).to(self.device)
                  for role in ("teacher", "generator", "fake")}
        copies["teacher"].requires_grad_(False)
        self.model = self.pipe.model = _Roles(**copies)  # the parent's LoRA-carrying base is dropped
        if cfg.gradient_checkpointing:
            for role in ("generator", "fake"):
                copies[role].enable_gradient_checkpointing()

    def generate(self, batch, gen):

        cond = self.pipe.condition(batch.instructions, batch.sources)
        noise = torch.randn(batch.sources.shape, generator=gen).to(self.device)
        with self.model.playing("generator"):
            x0, _ = unroll_two_steps(self.pipe.velocity_fn(cond), noise, self.pipe.sigmas(self.cfg.sampling_steps),
                                     gen, gradient_checkpointing=self.cfg.gradient_checkpointing)
        return x0

    def adapter_fn(self, fn, adapter: str | None):
        def call(x, t):
            with self.model.playing(adapter or "teacher"):
                return fn(x, t)
        return call

    def trained_parameters(self, role: str) -> list[nn.Parameter]:
        return list(self.model.editors[role].parameters())


def _training_step(trainer: NPEditTrainer, optimizer, params, batch, step: int) -> None:
    """One step as ``loop.train`` runs it: step_fn, backward, clipping, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    out = trainer.step(batch, step)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(params, trainer.cfg.grad_clip)
    optimizer.step()


def _npedit_setup(full_copies: bool, cfg: NPEditConfig, dataset, device: torch.device):
    if full_copies:
        trainer = FullCopiesNPEditTrainer(cfg, dataset, device)
        plain = LoopConfig(lr=cfg.lr, betas=cfg.betas, optimizer="adamw")  # fp32 torch AdamW
        params, fake = trainer.trained_parameters("generator"), trainer.trained_parameters("fake")
        trainer.fake_optimizer = make_optimizer(fake, plain)
        return trainer, make_optimizer(params, plain), params
    trainer = NPEditTrainer(cfg, dataset, device)
    loop = LoopConfig(lr=cfg.lr, betas=cfg.betas, optimizer=cfg.optimizer)  # as NPEditTrainer.fit builds them
    params = lora_parameters(trainer.model, "generator")
    trainer.fake_optimizer = make_optimizer(lora_parameters(trainer.model, "fake"), loop)
    return trainer, make_optimizer(params, loop), params


def bench_npedit_step(standins: dict[str, Path], batch_size: int = 16, repeats: int = 5, warmup: int = 1,
                      device: torch.device | None = None, seed: int = 0) -> dict[str, float]:
    """Seconds per NP-Edit step and peak memory, shared base + LoRA + 8-bit AdamW vs full copies."""
    device = device or torch.device("cpu")
    cfg = NPEditConfig(teacher_id=str(standins["teacher"]), judge_id=str(standins["judge"]), batch_size=batch_size,
                       curve_every=0, seed=seed)  # the tiny profile's step; no judge-vs-oracle checks
    dataset = UnpairedEdits(max(32, batch_size), seed)
    results = {}
    for name, full_copies in (("ours", False), ("baseline", True)):
        torch.manual_seed(seed)
        trainer, optimizer, params = _npedit_setup(full_copies, cfg, dataset, device)
        batch, counter = trainer.batch(0), itertools.count()
        step = lambda: _training_step(trainer, optimizer, params, batch, next(counter))  # noqa: E731
        seconds = median_seconds(step, repeats, warmup, device)
        optimizer.zero_grad(set_to_none=True)
        holders = [trainer.model, trainer.pipe.text_encoder, trainer.judge.model, optimizer, trainer.fake_optimizer]
        results[name] = (seconds, peak_memory_mb(step, holders, device))
        del trainer, optimizer, params, batch, step
        gc.collect()
    (ours_s, ours_mb), (base_s, base_mb) = results["ours"], results["baseline"]
    return {**compare("bench.npedit_step_s", ours_s, base_s, higher_is_better=False),
            **compare("bench.npedit_peak_mem_mb", ours_mb, base_mb, higher_is_better=False)}


# ------------------------------------------------------------------------------------ judge
def _yes_no_parser(text: str) -> float | None:

    verdict = parse_yes_no(text)
    return None if verdict is None else float(verdict)


def _judge_inputs(batch: int, seed: int, resolution: int = 32):
    """(source, other render) pairs in [-1, 1] with their NP-Edit questions, several per pair."""

    cfg = dataclasses.replace(world.WorldConfig(), resolution=resolution) if resolution != 32 else world.WorldConfig()
    rng = np.random.default_rng(seed)
    edits = [random_edit(world.sample_scene(rng, cfg), rng, cfg) for _ in range(batch)]
    sources = to_tensor(np.stack([world.render(e.source, cfg) for e in edits]))
    outputs = to_tensor(np.stack([world.render(e.target, cfg) for e in edits]))
    multi = [[questions.followed(e.instruction), questions.preserved(e.instruction), questions.QUALITY,
              questions.FOLLOWING_SCORE.format(instruction=e.instruction)] for e in edits]
    return [sources, outputs], [qs[0] for qs in multi], multi


@contextmanager
def _generation_settings(judge, **settings):
    """Set fields of the judge's generation config for the block, then put the old values back."""
    config = judge.model.generation_config
    previous = {name: getattr(config, name) for name in settings}
    for name, value in settings.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(config, name, value)


def bench_judge(judge, batch: int = 16, repeats: int = 5, warmup: int = 1, answer_tokens: int = 4,
                seed: int = 0, images_and_questions=None) -> dict[str, float]:
    """Answers per second: yes/no logits vs generate-and-parse, cached vs uncached generation,
    prefix reuse vs none.

    Generation is held to exactly ``answer_tokens`` new tokens (a random judge stops at an
    arbitrary point): a short verdict such as "answer : yes" and its end token. Longer answers
    (reasons, chain of thought) only widen the gap."""
    device = judge.device
    images, single, multi = images_and_questions or _judge_inputs(batch, seed)
    n = images[0].shape[0]

    def per_second(fn, answers: int) -> float:
        with torch.no_grad():
            return answers / median_seconds(fn, repeats, warmup, device)

    yes_no = per_second(lambda: judge.yes_no_logits(images, single), n)
    generated = lambda: judge.generate_score(images, single, max_new_tokens=answer_tokens,  # noqa: E731
                                             parser=_yes_no_parser)
    with _generation_settings(judge, min_new_tokens=answer_tokens):
        cached = per_second(generated, n)
        with _generation_settings(judge, use_cache=False):
            uncached = per_second(generated, n)
    answers = n * len(multi[0])
    reused = per_second(lambda: judge.yes_no_logits_multi(images, multi, reuse_prefix=True), answers)
    whole = per_second(lambda: judge.yes_no_logits_multi(images, multi, reuse_prefix=False), answers)
    return {**compare("bench.judge_yesno_per_s", yes_no, cached, higher_is_better=True),
            **compare("bench.judge_generate_per_s", cached, uncached, higher_is_better=True),
            **compare("bench.judge_prefix_reuse_per_s", reused, whole, higher_is_better=True)}


# ------------------------------------------------------------------------------------ sampling
def bench_sampling(pipe, batch: int = 16, steps: int = 4, repeats: int = 5, warmup: int = 1,
                   seed: int = 0) -> dict[str, float]:
    """Images per second of ``EditPipeline.edit``: one batched call vs one call per image."""
    edits = UnpairedEdits(batch, seed)
    instructions = [e.instruction for e in edits]

    def batched():
        pipe.edit(edits.sources, instructions, steps=steps, seed=seed)

    def one_at_a_time():
        for i in range(batch):
            pipe.edit(edits.sources[i:i + 1], instructions[i:i + 1], steps=steps, seed=seed + i)

    fast = batch / median_seconds(batched, repeats, warmup, pipe.device)
    slow = batch / median_seconds(one_at_a_time, repeats, warmup, pipe.device)
    return compare("bench.sampling_images_per_s", fast, slow, higher_is_better=True)


# ------------------------------------------------------------------------------------ CPU entry
def run_cpu_benchmarks(repeats: int = 5, warmup: int = 1, batch_size: int = 16, judge_batch: int = 16,
                       sampling_batch: int = 16, num_threads: int | None = None, root: Path | None = None,
                       seed: int = 0, progress: Callable[[str], None] | None = print
                       ) -> tuple[dict[str, float], dict[str, str]]:
    """Every CPU benchmark: (flat metrics ``bench.*`` with ``.baseline`` / ``.speedup``, device info)."""

    say = progress or (lambda message: None)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    device = torch.device("cpu")
    try:
        with tempfile.TemporaryDirectory(prefix="nb_edit_bench_") as scratch:
            standins = make_random_standins(Path(root or scratch), seed)
            metrics: dict[str, float] = {}
            say("bench: NP-Edit step (shared base + LoRA + 8-bit AdamW vs three full copies + fp32 AdamW)")
            metrics.update(bench_npedit_step(standins, batch_size, repeats, warmup, device, seed))
            say("bench: judge (yes/no logits vs generate-and-parse; KV cache; prefix reuse)")
            judge = VLMJudge.from_pretrained(standins["judge"], device="cpu").freeze()
            metrics.update(bench_judge(judge, judge_batch, repeats, warmup, seed=seed))
            say("bench: rollout sampling (batched vs one image at a time)")
            pipe = load_pipeline(standins["teacher"])
            metrics.update(bench_sampling(pipe, sampling_batch, repeats=repeats, warmup=warmup, seed=seed))
        info = device_info(device)
    finally:
        torch.set_num_threads(previous_threads)
    return metrics, info


def format_table(metrics: dict[str, float]) -> str:
    """One row per benchmark: value, baseline, speedup."""
    names = sorted(k for k in metrics if not k.endswith((".baseline", ".speedup")))
    rows = [f"{'benchmark':<34}{'value':>12}{'baseline':>12}{'speedup':>9}"]
    for name in names:
        rows.append(f"{name:<34}{metrics[name]:>12.4g}{metrics.get(name + '.baseline', math.nan):>12.4g}"
                    f"{metrics.get(name + '.speedup', math.nan):>8.2f}x")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------ GPU path
# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, by name.
BF16_PEAK_FLOPS = {"H200": 989.4e12, "H100 PCIe": 756.0e12, "H100": 989.4e12, "A100": 312.0e12,
                   "L40S": 362.05e12, "L4": 121.0e12, "A10G": 70.0e12, "A10": 125.0e12, "RTX 4090": 165.2e12}

KONTEXT_LATENT_CHANNELS = FLUX_LATENT_CHANNELS


def bf16_peak_flops(name: str) -> float | None:
    """The card's dense bf16 peak, or None for a card not in the table."""
    for key in sorted(BF16_PEAK_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in name.lower():
            return BF16_PEAK_FLOPS[key]
    return None


def dit_step_flops(n_linear_params: int, tokens: int, layers: int, width: int, frozen_base: bool = True) -> float:
    """Model FLOPs of one training step of a transformer on ``tokens`` tokens (checkpointing's
    recomputation not counted, as MFU defines it). Linear layers: 2 N T forward, 2 N T for the
    input gradients, 2 N T more for weight gradients unless the base is frozen (LoRA). Attention:
    4 T^2 d per layer forward (scores and weighted sum), twice that backward."""
    linear = (4 if frozen_base else 6) * n_linear_params * tokens
    return linear + 12 * layers * tokens**2 * width


def _linear_params(module: nn.Module) -> int:
    """Weights of every linear layer, counting 4-bit packed ones at their logical size."""
    total = 0
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features
    return total


def _random_kontext_folder(folder: Path) -> Path:
    """A FLUX.1-Kontext-sized transformer with random bf16 weights, saved once (about 24 GB)."""
    from diffusers import FluxTransformer2DModel

    if not (folder / "transformer" / "config.json").exists():
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):  # initialised on the card: minutes faster than on the CPU
                model = FluxTransformer2DModel.from_config(KONTEXT_DIT_CONFIG)
        finally:
            torch.set_default_dtype(previous)
        model.save_pretrained(str(folder / "transformer"), safe_serialization=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return folder


def bench_gpu_dit_step(folder: Path, resolution: int = 1024, text_tokens: int = 512, lora_rank: int = 64,
                       repeats: int = 3, warmup: int = 1, quantization: str | None = "4bit") -> dict[str, float]:
    """One Kontext-style LoRA training step (flow matching, reference tokens on the sequence) of
    the random FLUX.1-Kontext-sized DiT: seconds, peak memory (MB) and model FLOPs of the step."""
    import bitsandbytes

    device = torch.device("cuda")
    editor = load_editor(folder, "dit", quantization=quantization, dtype=torch.bfloat16, device=device,
                         latent_channels=KONTEXT_LATENT_CHANNELS)
    attach_lora(editor, lora_rank, adapter_name="generator")
    editor.enable_gradient_checkpointing()
    params = lora_parameters(editor, "generator")
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32 on a bf16 / 4-bit base
    optimizer = bitsandbytes.optim.AdamW8bit(params, lr=1e-4, betas=(0.0, 0.9))
    side = resolution // 8  # the FLUX VAE downsamples 8x
    gen = torch.Generator(device="cpu").manual_seed(0)
    target = torch.randn(1, KONTEXT_LATENT_CHANNELS, side, side, generator=gen).to(device, torch.bfloat16)
    source = torch.randn_like(target)
    text = torch.randn(1, text_tokens, KONTEXT_DIT_CONFIG["joint_attention_dim"], generator=gen).to(device)
    pooled = torch.randn(1, KONTEXT_DIT_CONFIG["pooled_projection_dim"], generator=gen).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fn = lambda x, t: editor(x, t, text, pooled, source_latents=source)  # noqa: E731
            loss = flow_matching_loss(fn, target, torch.Generator(device="cpu").manual_seed(1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    seconds = median_seconds(step, repeats, warmup, device)
    optimizer.zero_grad(set_to_none=True)
    peak = peak_memory_mb(step, [], device)
    image_tokens = 2 * (side // editor.patch) ** 2  # target + reference
    tokens = image_tokens + text_tokens
    layers = KONTEXT_DIT_CONFIG["num_layers"] + KONTEXT_DIT_CONFIG["num_single_layers"]
    width = KONTEXT_DIT_CONFIG["num_attention_heads"] * KONTEXT_DIT_CONFIG["attention_head_dim"]
    flops = dit_step_flops(_linear_params(editor.backbone), tokens, layers, width, frozen_base=True)
    del editor, optimizer, params, step
    gc.collect()
    torch.cuda.empty_cache()
    return {"step_s": seconds, "peak_mem_mb": peak, "flops": flops}


def llava_7b_judge(seed: int = 0, image_size: int = 336):
    """A judge shaped like LLaVA-1.5-7B (CLIP ViT-L/14-336 + a 32-layer 4096-wide Llama), random bf16
    weights on the GPU, with the tiny judge's word-level tokenizer (cost does not depend on it)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = judge_tokenizer(world.WorldConfig())
    tokenizer.add_special_tokens({"extra_special_tokens": [LLAVA_IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.model_max_length = 4096
    patches = (image_size // 14) ** 2
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "image_size": image_size, "patch_size": 14,
                       "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "projection_dim": 768},
        text_config={"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                     "max_position_embeddings": 4096},
        image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN), image_seq_length=patches,
        vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    return VLMJudge(model, tokenizer, processor).freeze()


def run_gpu_benchmarks(scratch: Path | None = None, repeats: int = 3, warmup: int = 1, judge_batch: int = 8,
                       progress: Callable[[str], None] | None = print) -> tuple[dict[str, float], dict[str, str]]:
    """The real-size benchmarks (``bench.gpu_*``); ``({}, {"skipped": why})`` without CUDA.

    ``scratch`` keeps the random 24 GB DiT checkpoint between runs (default: a temporary folder).
    The DiT baseline is the same LoRA step on the unquantised bf16 base; it is left out when it
    does not fit the card.
    """
    if not torch.cuda.is_available():
        return {}, {"skipped": "no CUDA device: the GPU benchmarks need one"}
    say = progress or (lambda message: None)
    device = torch.device("cuda")
    info = device_info(device)
    peak = bf16_peak_flops(info["name"])
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="nb_edit_gpu_bench_") as tmp:
        folder = _random_kontext_folder(Path(scratch or tmp))
        say("bench: Kontext-sized DiT LoRA step, 4-bit base + 8-bit AdamW + checkpointing")
        ours = bench_gpu_dit_step(folder, repeats=repeats, warmup=warmup, quantization="4bit")
        metrics["bench.gpu_dit_step_s"] = ours["step_s"]
        metrics["bench.gpu_dit_peak_mem_mb"] = ours["peak_mem_mb"]
        if peak:
            metrics["bench.gpu_dit_mfu"] = ours["flops"] / ours["step_s"] / peak
        say("bench: the same step on the bf16 base (baseline)")
        try:
            plain = bench_gpu_dit_step(folder, repeats=repeats, warmup=warmup, quantization=None)
            metrics.update(compare("bench.gpu_dit_step_s", ours["step_s"], plain["step_s"], higher_is_better=False))
            metrics.update(compare("bench.gpu_dit_peak_mem_mb", ours["peak_mem_mb"], plain["peak_mem_mb"],
                                   higher_is_better=False))
        except torch.OutOfMemoryError:
            say("bench: the bf16 baseline does not fit this card; its keys are left out")
            gc.collect()
            torch.cuda.empty_cache()
    say("bench: LLaVA-1.5-7B-sized judge")
    judge = llava_7b_judge()
    size = judge.image_processor.crop_size["height"]
    inputs = _judge_inputs(judge_batch, seed=0, resolution=32)
    images = [torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear").to(device) for img in inputs[0]]
    judged = bench_judge(judge, repeats=repeats, warmup=warmup, images_and_questions=(images, *inputs[1:]))
    metrics.update({k.replace("bench.judge_", "bench.gpu_judge_"): v for k, v in judged.items()})
    if peak:
        tokens = len(judge.prompt_ids(inputs[1][0], [(size // 14) ** 2] * 2)[0])
        vision_tokens = 2 * ((size // 14) ** 2 + 1)
        language, vision = judge.model.model.language_model, judge.model.model.vision_tower
        # linear layers only (2 N T): attention adds about 5% at these lengths and is left out
        forward_flops = 2 * (_linear_params(language) * tokens + _linear_params(vision) * vision_tokens)
        metrics["bench.gpu_judge_mfu"] = forward_flops * metrics["bench.gpu_judge_yesno_per_s"] / peak
    return metrics, {**info, "bf16_peak_flops": str(peak)}


# ------------------------------------------------------------------------------------ trainer check
# each paper's own editor family: NP-Edit and MT-EditFlow on FLUX.1-Kontext, Multi-Reward on InstructPix2Pix
TRAINER_CHECK = {"npedit": "flux_kontext", "multireward": "instruct_pix2pix", "mtrl": "flux_kontext"}
CHECK_SCENES = 64  # training scenes of the check's data (its cost is the steps', not the data's)


def run_gpu_trainer_check(scratch: Path, size: str = "real", steps: int = 2, pairs: dict[str, str] | None = None,
                          overrides: dict | None = None, progress: Callable[[str], None] | None = print,
                          ) -> tuple[dict[str, float], dict[str, str]]:
    """The three trainers, each through ``python -m nb_edit train``'s path (``registry.train_stage``)
    with the full profile's settings (NF4 bases, bf16, LoRA, 8-bit AdamW, gradient checkpointing,
    its batch sizes and resolution) for ``steps`` steps on random models of the hub
    architectures (``standins.hub_layout``, ``size="real"``: a 12B FLUX.1-Kontext transformer with
    T5-XXL, SD 1.5's InstructPix2Pix UNet, a Qwen2.5-VL-7B judge; about 55 GB written once to
    ``scratch``). Records per stage: median step seconds, peak GPU memory, load-and-train seconds.

    ``size="tiny"`` with ``overrides={"quantization": None}`` runs the same code on a CPU (the
    test). Real size without CUDA returns ``({}, {"skipped": why})``.
    """
    if size == "real" and not torch.cuda.is_available():
        return {}, {"skipped": "no CUDA device: the real-size trainer check needs one"}
    say = progress or (lambda message: None)
    pairs = pairs or TRAINER_CHECK
    scratch = Path(scratch)
    settings = RunSettings.for_profile("full")
    folders: dict[str, Path] = {}
    for family in sorted(set(pairs.values())):
        folder = scratch / f"{family}_{size}"
        if not (folder / "model_index.json").exists():
            say(f"gpu check: writing a random {family} ({size}) to {folder}")
            hub_layout.EDITOR_FAMILIES[family](folder, size=size)
        folders[family] = folder
    judge = scratch / f"qwen2_5_vl_{size}"
    if not (judge / "config.json").exists():
        say(f"gpu check: writing a random Qwen2.5-VL judge ({size}) to {judge}")
        hub_layout.qwen_judge(judge, size=size, image_size=settings.resolution)
    data = shapesworld(settings.replace(n_train_scenes=min(settings.n_train_scenes, CHECK_SCENES),
                                        n_sequences=min(settings.n_sequences, CHECK_SCENES // 4)), seed=0)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    metrics: dict[str, float] = {}
    for stage, family in pairs.items():
        say(f"gpu check: {stage} on {family}, {steps} steps")
        cfg = registry.stage_config(stage, "full", {registry.MODEL_SETTING[stage]: str(folders[family]),
                                                    "judge_id": str(judge), "steps": steps, "checkpoint_every": steps,
                                                    **({"curve_every": 0} if stage == "npedit" else {}),
                                                    **(overrides or {})})
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        _, history = registry.train_stage(stage, cfg, data, scratch / "runs" / f"{stage}_{family}_{size}")
        key = f"gpu_check.{stage}"
        metrics[f"{key}.run_s"] = time.perf_counter() - start
        metrics[f"{key}.step_s"] = statistics.median(h["step_s"] for h in history if "loss_copy" not in h)
        if device.type == "cuda":
            metrics[f"{key}.peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
        del history
        gc.collect()
    return metrics, {**device_info(device), "size": size, "pairs": ", ".join(f"{k}={v}" for k, v in pairs.items())}
