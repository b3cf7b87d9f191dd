"""A tiny training run for tests/test_resume.py, run in its own process so it can be SIGKILLed.

    python tests/resume_worker.py CKPT_DIR OUT_PREFIX STEPS CHECKPOINT_EVERY SLEEP_PER_STEP

Prints ``step N`` after each step; at the end writes OUT_PREFIX.json (history, first step run)
and OUT_PREFIX.safetensors (final weights and EMA). The model has dropout (torch RNG), a
BatchNorm (buffers) and a layer big enough for 8-bit AdamW states; step_fn also draws from
Python's and NumPy's RNGs, so every RNG state must survive a resume for the run to match.
"""

import json
import random
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

from nb_edit.training.loop import LoopConfig, train

SEED = 3


def build_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))


def batch_fn(step: int):
    """Deterministic data: the batch of a step depends only on (SEED, step)."""
    generator = torch.Generator().manual_seed(SEED * 100_003 + step)
    x = torch.randn(32, 16, generator=generator)
    return x, torch.sin(x[:, :4] * 2.0) + 0.1 * torch.randn(32, 4, generator=generator)


def main(ckpt_dir: str, out_prefix: str, steps: int, checkpoint_every: int, sleep: float) -> None:
    torch.set_num_threads(1)
    model = build_model()
    config = LoopConfig(steps=steps, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01, optimizer="adamw8bit",
                        grad_clip=1.0, ema_decay=0.9, checkpoint_every=checkpoint_every, keep_last=2,
                        warmup_steps=5, seed=SEED)

    def step_fn(batch, step):
        x, y = batch
        jitter = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
        prediction = model(x + 0.05 * torch.randn_like(x))
        return {"loss": torch.nn.functional.mse_loss(prediction, y) * jitter, "jitter": torch.tensor(jitter)}

    ran = []

    def log_fn(step, record):
        ran.append(step)
        print(f"step {step}", flush=True)
        time.sleep(sleep)

    history = train(step_fn, {"mlp": model}, config=config, ckpt_dir=ckpt_dir, batch_fn=batch_fn,
                    log_fn=log_fn, progress=False)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in history.ema.shadow["mlp"].items()})
    save_file(tensors, f"{out_prefix}.safetensors")
    with open(f"{out_prefix}.json", "w") as handle:
        json.dump({"history": list(history), "first_step_run": ran[0] if ran else None}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
