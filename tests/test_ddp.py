"""Data parallelism of nb_edit.training.loop: 2 CPU processes (gloo) = 1 process on the doubled batch.

The processes are started by ``torch.distributed.run``, the launcher ``accelerate launch
--multi_gpu`` uses on GPUs (``accelerate launch --cpu`` starts one process unless MPI is set up),
so the worker sees the same environment (RANK, WORLD_SIZE, MASTER_ADDR) as under accelerate.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nb_edit.training.checkpoint import latest_checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")
STEPS = 6


def _launch(args: list[str], tmp_path: Path, name: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=150)
    (tmp_path / f"{name}.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without the gloo backend")
def test_two_processes_match_one_process_on_the_doubled_batch(tmp_path):
    _launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
             str(tmp_path / "ddp"), str(tmp_path / "ddp_ckpt"), str(STEPS)], tmp_path, "ddp")
    _launch([str(WORKER), str(tmp_path / "single"), str(tmp_path / "single_ckpt"), str(STEPS)], tmp_path, "single")

    rank0, rank1 = load_file(tmp_path / "ddp.rank0.safetensors"), load_file(tmp_path / "ddp.rank1.safetensors")
    single = load_file(tmp_path / "single.rank0.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys()
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"{key}: the two processes took different updates"
        # the same math in another summation order: equal up to float rounding
        torch.testing.assert_close(value, single[key], rtol=1e-5, atol=1e-6, msg=f"{key} differs from one process")
    assert float(single["grad_norm"].min()) > 0.05  # clipping (at 0.05) bound at every step
    assert not list((tmp_path / "ddp_ckpt").glob(".tmp-*"))  # no writer raced another
    newest = latest_checkpoint(tmp_path / "ddp_ckpt")  # written by process 0 only, then resumed by both
    assert newest is not None and newest.name == f"step_{STEPS:08d}"


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_npedit_command_runs_in_two_processes(tmp_path, smoke_standins):
    """``python -m nb_edit train npedit`` under the launcher: both processes finish, one writes."""
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NB_EDIT_CACHE": str(tmp_path / "cache"), "NB_EDIT_SMOKE": ""}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
            "-m", "nb_edit", "train", "npedit", "--profile", "smoke", "--ckpt-dir", str(ckpt),
            "--set", f"teacher_id={smoke_standins / 'teacher'}", "--set", f"judge_id={smoke_standins / 'judge'}",
            "--set", "curve_every=0"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert done.stdout.count("train npedit: 2 steps after 1 copy warm-up steps") == 2  # each process ran them all
    assert latest_checkpoint(ckpt) is not None and latest_checkpoint(ckpt).name.endswith("2")
