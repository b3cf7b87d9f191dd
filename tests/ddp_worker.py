"""A tiny data-parallel training run for tests/test_ddp.py.

    accelerate launch --cpu --num_processes 2 tests/ddp_worker.py OUT_PREFIX CKPT_DIR STEPS
    python tests/ddp_worker.py OUT_PREFIX CKPT_DIR STEPS          # one process, the whole batch

Every step draws one global batch from (SEED, step); under a launcher each process trains on
its contiguous shard and ``nb_edit.training.loop.train`` averages the gradients, so the result
must equal one process trained on the whole batch. The run stops at STEPS // 2 and is resumed
to STEPS in the same processes, so the shared checkpoint folder (written by process 0 only) is
read back by every process. The model has a 4096-element layer, an auxiliary model updated
inside ``step_fn`` (as NP-Edit's fake score) and gradient clipping that binds (the norm of the
averaged gradient must be the one clipped). Writes OUT_PREFIX.rank<R>.safetensors per process.
"""

import os
import sys

import torch
from safetensors.torch import save_file

from nb_edit.training.loop import LoopConfig, train

SEED, GLOBAL_BATCH = 5, 16


def build_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(SEED)
    main = torch.nn.Sequential(torch.nn.Linear(8, 512), torch.nn.Tanh(), torch.nn.Linear(512, 3))
    aux = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return main, aux


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED * 100_003 + step)
    x = torch.randn(GLOBAL_BATCH, 8, generator=generator)
    return x, torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin(), x[:, 3:].sum(1)], dim=1)


def run(out_prefix: str, ckpt_dir: str, steps: int, rank: int = 0, world: int = 1) -> None:
    torch.set_num_threads(1)
    main, aux = build_models()
    aux_optimizer = torch.optim.AdamW(aux.parameters(), lr=1e-2)
    shard = GLOBAL_BATCH // world

    def batch_fn(step):
        x, y = global_batch(step)
        return x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]

    def step_fn(batch, step):
        x, y = batch
        for _ in range(2):  # inner updates of an auxiliary model, averaged by the loop's step hook
            aux_optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(aux(x), main(x).detach()).backward()
            aux_optimizer.step()
        return {"loss": torch.nn.functional.mse_loss(main(x), y)}

    for stop in (steps // 2, steps):  # stop half-way, then resume from the shared checkpoint
        config = LoopConfig(steps=stop, lr=3e-2, optimizer="adamw", grad_clip=0.05, checkpoint_every=2, seed=SEED)
        history = train(step_fn, {"main": main, "aux": aux}, config=config, ckpt_dir=ckpt_dir, batch_fn=batch_fn,
                        optimizers={"main": torch.optim.AdamW(main.parameters(), lr=3e-2)},
                        aux_optimizers={"aux": aux_optimizer}, progress=False)
    tensors = {f"main.{k}": v.contiguous() for k, v in main.state_dict().items()}
    tensors.update({f"aux.{k}": v.contiguous() for k, v in aux.state_dict().items()})
    tensors["grad_norm"] = torch.tensor([r["grad_norm"] for r in history])
    save_file(tensors, f"{out_prefix}.rank{rank}.safetensors")


def main() -> None:
    out_prefix, ckpt_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        run(out_prefix, ckpt_dir, steps)
        return
    torch.distributed.init_process_group("gloo")  # rank and world size from the launcher's environment
    try:
        run(out_prefix, ckpt_dir, steps, torch.distributed.get_rank(), world)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
