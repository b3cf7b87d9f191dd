"""The full profile's code path on CPU: hub-layout models of the real classes, loaded by path.

Tiny random FLUX.1-Kontext and InstructPix2Pix pipelines and a Qwen2.5-VL judge are written with
``save_pretrained`` (``tests/hub_models.py``; nothing downloads) and every trainer runs through
the README's command, ``python -m nb_edit train <stage> --profile full``, with the full profile's
settings except the two a CPU cannot hold (``quantization=null``; bf16 falls back to fp32 with a
warning) and ``NB_EDIT_SMOKE=1`` for toy sizes. Each run is SIGKILLed after its first
checkpoint and resumed by the same command. Notebooks 05-07 run under papermill with
``profile=full`` on the same folders.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import hub_models

ROOT = Path(__file__).resolve().parents[1]
KILLER = Path(__file__).with_name("kill_worker.py")
STAGE_MODEL = {"npedit": "teacher_id", "multireward": "editor_id", "mtrl": "policy_id"}
# checkpoints before the first one of the main stage: NP-Edit's copy warm-up saves one first
FIRST_MAIN_CHECKPOINT = {"npedit": 2, "multireward": 1, "mtrl": 1}
FAMILIES = tuple(hub_models.EDITOR_FAMILIES)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    folders = {name: build(root / name) for name, build in hub_models.EDITOR_FAMILIES.items()}
    folders["judge"] = hub_models.qwen_judge(root / "qwen2_5_vl")
    return folders


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Toy sizes, one thread, an artifact cache of this module's own."""
    return {**os.environ, "NB_EDIT_SMOKE": "1", "NB_EDIT_THREADS": "1",
            "NB_EDIT_CACHE": str(tmp_path_factory.mktemp("cache")),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def _train_args(stage, family, hub, ckpt):
    return ["train", stage, "--profile", "full", "--ckpt-dir", str(ckpt),
            "--set", f"{STAGE_MODEL[stage]}={hub[family]}", "--set", f"judge_id={hub['judge']}",
            "--set", "quantization=null", "--set", "steps=2", "--set", "checkpoint_every=1"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stage", tuple(STAGE_MODEL))
def test_trainer_runs_the_full_code_path_is_killed_and_resumes(stage, family, hub, env, tmp_path):
    ckpt = tmp_path / "run"
    args = _train_args(stage, family, hub, ckpt)
    victim = subprocess.run([sys.executable, str(KILLER), str(FIRST_MAIN_CHECKPOINT[stage]), *args], env=env,
                            capture_output=True, text=True, timeout=900)
    assert victim.returncode == -signal.SIGKILL, victim.stderr[-3000:]
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000001"], "killed after the first main step"

    resumed = subprocess.run([sys.executable, "-m", "nb_edit", *args], env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000001 (step 1)" in resumed.stderr, resumed.stderr[-3000:]
    assert f"train {stage}: 2 steps" in resumed.stdout
    assert (ckpt / "step_00000002").is_dir()
    assert "CPUFallbackWarning" in resumed.stderr  # the full profile's bf16, run in fp32 here


def test_notebooks_05_to_07_run_under_papermill_with_the_full_profile(hub, env, tmp_path, monkeypatch):
    """``python -m nb_edit run -f <parameters>`` with ``profile: full`` and the hub-layout folders:
    the three method notebooks train every variant of the full profile's configuration and
    evaluate it; the runs they trained are the ones notebook 08 would look for."""
    from nb_edit.core.config import RunSettings
    from nb_edit.data.world_datasets import shapesworld
    from nb_edit.methods import registry

    unquantised = {"quantization": None}
    params = dict(profile="full", teacher_id=str(hub["flux_kontext"]), editor_clean_id=str(hub["instruct_pix2pix"]),
                  editor_id=str(hub["instruct_pix2pix"]), policy_id=str(hub["flux_kontext"]), judge_id=str(hub["judge"]),
                  npedit_overrides=unquantised, multireward_overrides=unquantised, mtrl_overrides=unquantised)
    (tmp_path / "full_cpu.yaml").write_text(json.dumps(params))  # JSON is YAML
    run_env = {**env, "NB_EDIT_RUNS": str(tmp_path / "runs")}
    done = subprocess.run([sys.executable, "-m", "nb_edit", "run", "--run-id", "full_cpu", "--only", "05,06,07",
                           "-f", str(tmp_path / "full_cpu.yaml")], env=run_env, capture_output=True, text=True,
                          timeout=1800, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    metrics = json.loads((tmp_path / "runs" / "full_cpu" / "metrics.json").read_text())
    for key in ("npedit.full.oracle_success", "multireward.reward.oracle_success",
                "mtrl.grpo_broadcast.turn3_task_success"):
        assert key in metrics, key

    for name in ("NB_EDIT_SMOKE", "NB_EDIT_CACHE"):
        monkeypatch.setenv(name, env[name])
    data = shapesworld(RunSettings.for_profile("full"), seed=0)
    found = registry.trained_runs("full", 0, data, judge_id=params["judge_id"], teacher_id=params["teacher_id"],
                                  editor_id=params["editor_id"], policy_id=params["policy_id"],
                                  npedit_overrides=unquantised, multireward_overrides=unquantised,
                                  mtrl_overrides=unquantised)
    assert len(found) == 13 and all(run.finished for run in found), [(r.name, r.status) for r in found]
    assert {run.config.profile for run in found} == {"full"}
    assert all(run.config.mixed_precision == "bf16" for run in found)  # the full profile's settings, held on CPU
