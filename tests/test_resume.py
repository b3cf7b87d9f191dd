"""Checkpoint, resume and the non-finite guard of nb_edit.training."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nb_edit.training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from nb_edit.training.loop import LoopConfig, NonFiniteError, train

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS, EVERY = 30, 5


def _worker(ckpt_dir, out_prefix, sleep, tmp_path, name):
    log = open(tmp_path / f"{name}.stderr", "w")
    process = subprocess.Popen([sys.executable, str(WORKER), str(ckpt_dir), str(out_prefix), str(STEPS),
                                str(EVERY), str(sleep)], stdout=subprocess.PIPE, stderr=log, text=True)
    return process, log


def _finish(process, log, tmp_path, name):
    process.wait(timeout=120)
    log.close()
    assert process.returncode == 0, (tmp_path / f"{name}.stderr").read_text()[-3000:]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    kill_at = random.randint(EVERY + 1, STEPS - 3)  # after at least one checkpoint
    reference, ref_log = _worker(tmp_path / "ref_ckpt", tmp_path / "ref", 0.0, tmp_path, "ref")
    victim, victim_log = _worker(tmp_path / "ckpt", tmp_path / "run", 0.05, tmp_path, "victim")
    for line in victim.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= kill_at:
            os.kill(victim.pid, signal.SIGKILL)
            break
    victim.wait(timeout=60)
    victim_log.close()
    assert victim.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_at}"
    survivor = latest_checkpoint(tmp_path / "ckpt")
    assert survivor is not None and int(survivor.name.split("_")[1]) <= kill_at + 1
    optimizer_state = torch.load(survivor / "state.pt", weights_only=True)["optimizers"]["main"]["state"]
    quantised = [s["__bnb_optimizer_quant_state__"] for s in optimizer_state.values()]
    assert any(q["state1"].dtype == torch.uint8 for q in quantised)  # 8-bit AdamW states are kept

    resumed, resumed_log = _worker(tmp_path / "ckpt", tmp_path / "run", 0.0, tmp_path, "resumed")
    resumed.stdout.read()
    _finish(resumed, resumed_log, tmp_path, "resumed")
    _finish(reference, ref_log, tmp_path, "ref")

    ref = json.loads((tmp_path / "ref.json").read_text())
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["first_step_run"] > 0, f"killed at {kill_at} but the second process started from scratch"
    assert [r["step"] for r in run["history"]] == list(range(STEPS))
    assert [r["loss"] for r in run["history"]] == [r["loss"] for r in ref["history"]], f"kill at {kill_at}"
    ref_weights, run_weights = load_file(tmp_path / "ref.safetensors"), load_file(tmp_path / "run.safetensors")
    assert ref_weights.keys() == run_weights.keys() and any(k.startswith("ema.") for k in ref_weights)
    for key, value in ref_weights.items():
        assert torch.equal(value, run_weights[key]), f"{key} differs after a kill at step {kill_at}"


def _tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=generator)
    return x, x.sum(dim=1, keepdim=True)


def _mse_step(model, poison=lambda step: False):
    def step_fn(batch, step):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        return {"loss": loss * float("nan") if poison(step) else loss}
    return step_fn


def test_nonfinite_streak_raises_and_last_good_checkpoint_is_intact(tmp_path):
    model = _tiny()
    config = LoopConfig(steps=20, lr=1e-2, optimizer="adamw", checkpoint_every=5, max_nonfinite=3)
    snapshots = {}

    def log_fn(step, record):
        snapshots[step + 1] = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(NonFiniteError) as caught:
        train(_mse_step(model, poison=lambda s: s >= 7), {"net": model}, config=config, ckpt_dir=tmp_path,
              batch_fn=_batch, log_fn=log_fn, progress=False)
    message = str(caught.value)
    assert "step 9" in message and "intact" in message and "step_00000005" in message
    assert caught.value.step == 9 and latest_checkpoint(tmp_path) == caught.value.checkpoint
    assert all(torch.equal(snapshots[7][k], v) for k, v in model.state_dict().items())  # no NaN update
    fresh = _tiny(seed=1)
    state = load_checkpoint(latest_checkpoint(tmp_path), {"net": fresh})
    assert state["step"] == 5 and len(state["history"]) == 5
    for key, value in fresh.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, snapshots[5][key])


def test_one_nonfinite_gradient_is_skipped_and_counted(tmp_path):
    model = _tiny()
    before, hooks = {}, []

    def step_fn(batch, step):
        x, y = batch
        if step == 3:  # a finite loss whose gradient is infinite
            before.update({k: v.clone() for k, v in model.state_dict().items()})
            hooks.append(model[0].weight.register_hook(lambda grad: grad * float("inf")))
        return {"loss": torch.nn.functional.mse_loss(model(x), y)}

    def log_fn(step, record):
        if step == 3:
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
            hooks.pop().remove()

    history = train(step_fn, {"net": model}, config=LoopConfig(steps=6, optimizer="adamw", checkpoint_every=3),
                    ckpt_dir=tmp_path, batch_fn=_batch, log_fn=log_fn, progress=False)
    assert [r["skipped"] for r in history] == [0, 0, 0, 1, 0, 0]
    assert history[-1]["nonfinite_total"] == 1 and np.isfinite(history[3]["loss"])


def test_inprocess_resume_with_aux_optimizer_and_ema_matches(tmp_path):
    def run(ckpt_dir, stops):
        main, aux = _tiny(0), _tiny(1)
        aux_opt = torch.optim.AdamW(aux.parameters(), lr=1e-2)

        def step_fn(batch, step):
            x, y = batch
            for _ in range(2):  # inner updates on the auxiliary model, as NP-Edit's fake score
                aux_opt.zero_grad()
                torch.nn.functional.mse_loss(aux(x), main(x).detach()).backward()
                aux_opt.step()
            return {"loss": torch.nn.functional.mse_loss(main(x) + 0.01 * torch.randn(8, 1), y)}

        for steps in stops:
            history = train(step_fn, {"main": main, "aux": aux}, ckpt_dir=ckpt_dir, batch_fn=_batch,
                            optimizers={"main": torch.optim.AdamW(main.parameters(), lr=1e-2)},
                            aux_optimizers={"aux": aux_opt}, progress=False,
                            config=LoopConfig(steps=steps, optimizer="adamw", ema_decay=0.8, checkpoint_every=2))
        return history, main, aux

    straight, main_a, aux_a = run(tmp_path / "a", [8])
    resumed, main_b, aux_b = run(tmp_path / "b", [5, 8])  # a first run of 5 steps, then on to 8
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed] and len(resumed) == 8
    for a, b in zip([*main_a.parameters(), *aux_a.parameters()], [*main_b.parameters(), *aux_b.parameters()]):
        assert torch.equal(a, b)
    assert all(torch.equal(straight.ema.shadow["main"][k], v) for k, v in resumed.ema.shadow["main"].items())


class _Sampler:
    """A resumable data source: its position is checkpointed through state_dict()."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return _batch(1000 + self.position)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_resumable_sampler_continues_where_it_stopped(tmp_path):
    def run(ckpt_dir, stops):
        model = _tiny()
        for steps in stops:
            sampler = _Sampler()  # a fresh one, as in a new process: its position comes from the checkpoint
            history = train(_mse_step(model), {"net": model}, batch_fn=sampler, ckpt_dir=ckpt_dir, progress=False,
                            config=LoopConfig(steps=steps, optimizer="adamw", checkpoint_every=2))
        return history, sampler.position

    (straight, position_a), (resumed, position_b) = run(tmp_path / "a", [6]), run(tmp_path / "b", [3, 6])
    assert position_a == position_b == 6 and [r["loss"] for r in straight] == [r["loss"] for r in resumed]


def test_finished_run_returns_its_history_without_training(tmp_path):
    model = _tiny()
    config = LoopConfig(steps=4, optimizer="adamw", checkpoint_every=2)
    first = train(_mse_step(model), {"net": model}, config=config, ckpt_dir=tmp_path, batch_fn=_batch, progress=False)
    again = train(lambda b, s: pytest.fail("a finished run must not train again"), {"net": model}, config=config,
                  ckpt_dir=tmp_path, batch_fn=_batch, progress=False)
    assert list(again) == list(first) and len(again) == 4


def test_latest_checkpoint_ignores_incomplete_ones_and_keeps_last_k(tmp_path):
    model = _tiny()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, modules={"net": model}, state={"history": []}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    (tmp_path / ".tmp-step_00000009.123").mkdir()  # a writer killed before its commit
    (tmp_path / "step_00000007").mkdir()  # no manifest
    truncated = save_checkpoint(tmp_path, 8, modules={"net": model}, state={})
    with open(truncated / "state.pt", "r+b") as handle:
        handle.truncate(10)
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    state = torch.load(tmp_path / "step_00000004" / "state.pt", weights_only=True)
    assert state["step"] == 4
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(truncated, {"net": model})


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_bad_loop_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        LoopConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="mixed_precision='no' on CPU"):
        train(_mse_step(_tiny()), {"net": _tiny()}, config=LoopConfig(mixed_precision="bf16"),
              ckpt_dir=tmp_path, batch_fn=_batch, progress=False)
    with pytest.raises(TypeError, match="'loss'"):
        train(lambda b, s: 1.0, {"net": _tiny()}, config=LoopConfig(steps=1, optimizer="adamw"),
              ckpt_dir=tmp_path, batch_fn=_batch, progress=False)
    model = _tiny()
    train(_mse_step(model), {"net": model}, config=LoopConfig(steps=2, optimizer="adamw", checkpoint_every=1),
          ckpt_dir=tmp_path / "kept", batch_fn=_batch, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):  # resume=False never overwrites a run
        train(_mse_step(model), {"net": model}, config=LoopConfig(steps=2, optimizer="adamw"),
              ckpt_dir=tmp_path / "kept", batch_fn=_batch, progress=False, resume=False)


def test_wsd_schedule_extends_a_constant_run_by_resuming_it(tmp_path):
    """"wsd" is the constant schedule up to steps - decay_steps, then linear to 0; so a finished
    constant-lr run, resumed under "wsd" with more steps, equals an uninterrupted "wsd" run."""
    wsd = LoopConfig(steps=8, lr=1e-2, optimizer="adamw", checkpoint_every=2, warmup_steps=2, schedule="wsd",
                     decay_steps=4)

    def run(ckpt_dir, configs):
        model = _tiny()
        for config in configs:
            history = train(_mse_step(model), {"net": model}, config=config, ckpt_dir=ckpt_dir, batch_fn=_batch,
                            progress=False)
        return history, model

    straight, model_a = run(tmp_path / "a", [wsd])
    extended, model_b = run(tmp_path / "b", [LoopConfig(**{**wsd.__dict__, "steps": 4, "schedule": "constant",
                                                           "decay_steps": 0}), wsd])
    lrs = [r["lr"] for r in straight]  # logged after the scheduler's step: the lr the next step uses
    np.testing.assert_allclose(lrs, [1e-2, 1e-2, 1e-2, 1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
    assert [r["lr"] for r in extended] == lrs and [r["loss"] for r in extended] == [r["loss"] for r in straight]
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    with pytest.raises(ValueError, match="decay_steps"):
        LoopConfig(steps=4, schedule="wsd", decay_steps=5)
