"""The full profile's code path on CPU: hub-layout models of the real classes, loaded by path.

Tiny random FLUX.1-Kontext and InstructPix2Pix pipelines and a Qwen2.5-VL judge are written with
``save_pretrained`` (``nb_edit.standins.hub_layout``; nothing downloads) and every trainer runs through
the README's command, ``python -m nb_edit train <stage> --profile full``, with the full profile's
settings except the two a CPU cannot hold (``quantization=null``; bf16 falls back to fp32 with a
warning) and ``NB_EDIT_SMOKE=1`` for toy sizes. Each run is SIGKILLed after its first
checkpoint, resumed by the same command, and exported; the stock diffusers pipeline of its
family loads the export. Notebooks 05-07 run under papermill with ``profile=full`` on the same
folders, and ``gpu-check`` runs its code at tiny size.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import FluxKontextPipeline, StableDiffusionInstructPix2PixPipeline

from nb_edit.methods import registry
from nb_edit.standins import hub_layout

ROOT = Path(__file__).resolve().parents[1]
KILLER = Path(__file__).with_name("kill_worker.py")
STAGE_MODEL = registry.MODEL_SETTING  # npedit: teacher_id, multireward: editor_id, mtrl: policy_id
# checkpoints before the first one of the main stage: NP-Edit's copy warm-up saves one first
FIRST_MAIN_CHECKPOINT = {"npedit": 2, "multireward": 1, "mtrl": 1}
FAMILIES = tuple(hub_layout.EDITOR_FAMILIES)
STOCK_PIPELINES = {"flux_kontext": FluxKontextPipeline, "instruct_pix2pix": StableDiffusionInstructPix2PixPipeline}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    folders = {name: build(root / name) for name, build in hub_layout.EDITOR_FAMILIES.items()}
    folders["judge"] = hub_layout.qwen_judge(root / "qwen2_5_vl")
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

    # the README's last command: the trained LoRA, read by the stock diffusers pipeline of that family
    from nb_edit import cli

    assert cli.main(["export", str(ckpt), "--to", str(tmp_path / "lora")]) == 0
    pipe = STOCK_PIPELINES[family].from_pretrained(hub[family])
    pipe.load_lora_weights(tmp_path / "lora")
    denoiser = "transformer" if family == "flux_kontext" else "unet"
    assert pipe.get_list_adapters().get(denoiser), pipe.get_list_adapters()


def test_notebooks_05_to_07_run_under_papermill_with_the_full_profile(hub, env, tmp_path, monkeypatch):
    """``python -m nb_edit run -f <parameters>`` with ``profile: full`` and the hub-layout folders:
    the three method notebooks train the main job's runs (``registry.MAIN_RUNS``) in the full
    profile's configuration and evaluate them; the runs they trained are the ones notebook 08
    would look for."""
    from nb_edit.core.config import RunSettings
    from nb_edit.data.world_datasets import shapesworld

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
    expected = sum(map(len, registry.MAIN_RUNS.values()))
    assert len(found) == expected and all(run.finished for run in found), [(r.name, r.status) for r in found]
    assert {run.config.profile for run in found} == {"full"}
    assert all(run.config.mixed_precision == "bf16" for run in found)  # the full profile's settings, held on CPU


def test_gpu_trainer_check_runs_its_code_at_tiny_size(env, tmp_path, monkeypatch, capsys):
    """``python -m nb_edit gpu-check --size tiny``: the real-size check's code (random hub-layout
    models written, each trainer through ``train_stage`` with the full profile's settings, figures
    recorded) on small models; on a GPU ``--size real`` runs the same with the hub architectures."""
    from nb_edit import cli
    from nb_edit.core import paths

    for name in ("NB_EDIT_SMOKE", "NB_EDIT_CACHE"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path / "runs")
    assert cli.main(["gpu-check", "--scratch", str(tmp_path / "scratch"), "--size", "tiny", "--run-id", "check"]) == 0
    metrics = json.loads((tmp_path / "runs" / "check" / "metrics.json").read_text())
    for stage in ("npedit", "multireward", "mtrl"):
        assert metrics[f"gpu_check.{stage}.step_s"] > 0 and metrics[f"gpu_check.{stage}.run_s"] > 0
    assert "gpu_check.npedit.step_s" in capsys.readouterr().out


def test_the_gpu_checks_real_sizes_are_the_hub_architectures():
    """The real-size configs of ``hub_layout`` (built on the meta device: no memory) have the
    parameter counts of the hub models they stand for."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        T5Config,
        T5EncoderModel,
    )

    def count(model):
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        sizes = {  # built -> the hub model's count
            "FLUX.1-Kontext-dev transformer": (count(FluxTransformer2DModel(**hub_layout.KONTEXT_DIT_CONFIG)), 11.90e9),
            "T5-XXL encoder": (count(T5EncoderModel(T5Config(**hub_layout.T5_XXL_ENCODER))), 4.76e9),
            "InstructPix2Pix UNet": (count(UNet2DConditionModel(**hub_layout.IP2P_UNET_CONFIG)), 0.8595e9),
            "FLUX.1 VAE": (count(AutoencoderKL(**hub_layout.FLUX_VAE_CONFIG)), 83.8e6),
            "SD VAE": (count(AutoencoderKL(**hub_layout.SD_VAE_CONFIG)), 83.7e6),
            "CLIP-L text": (count(CLIPTextModel(CLIPTextConfig(vocab_size=49408, **hub_layout.CLIP_L_TEXT))), 123.1e6),
            "Qwen2.5-VL-7B": (count(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hub_layout.QWEN25_VL_7B))),
                              8.29e9),
        }
    for name, (built, hub) in sizes.items():
        assert abs(built / hub - 1) < 0.005, f"{name}: {built:,} parameters, the hub model has about {hub:,.0f}"
