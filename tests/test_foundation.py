"""Paths, profiles, run folders, the metrics contract, the artifact cache and the report."""

import json

import numpy as np
import pytest
import torch

from nb_edit.core import cache, paths, runs
from nb_edit.core.config import RunSettings, resolve_profile
from nb_edit.evaluation import report


def test_paths_do_not_depend_on_working_directory(tmp_path, monkeypatch):
    root = paths.repo_root()
    monkeypatch.chdir(tmp_path)
    assert paths.repo_root() == root
    assert (root / "pyproject.toml").exists()
    assert paths.notebooks_dir() == root / "notebooks"


def test_profiles_and_smoke_override(monkeypatch):
    monkeypatch.delenv("NB_EDIT_SMOKE", raising=False)
    assert RunSettings.for_profile("tiny").resolution == 32
    assert RunSettings.for_profile("tiny").n_eval >= 512  # the main job's figures: intervals of about +-0.04
    assert RunSettings.for_profile("full").mixed_precision == "bf16"
    monkeypatch.setenv("NB_EDIT_SMOKE", "1")
    assert resolve_profile("tiny") == "smoke"
    assert resolve_profile("full") == "full"  # the override never shrinks a full run
    assert RunSettings.for_profile("tiny").n_eval < RunSettings().n_eval


def test_unknown_profile_and_setting_are_named():
    with pytest.raises(ValueError, match="profile='huge'.*tiny, full, smoke"):
        RunSettings.for_profile("huge")
    with pytest.raises(TypeError, match="no setting.*resolutoin"):
        RunSettings.for_profile("tiny", resolutoin=64)


def test_config_json_round_trip():
    cfg = RunSettings.for_profile("tiny", seed=3)
    assert RunSettings.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path / "runs")
    return runs.open_run("unit")


def test_record_metrics_merges_and_checks(run):
    runs.record_metrics(run, {"world.oracle_parse_acc_clean": 0.995})
    runs.record_metrics(run, {"npedit.full.oracle_success": torch.tensor(0.5), "env.flag": True})
    data = json.loads(run.metrics_path.read_text())
    assert data == {"world.oracle_parse_acc_clean": 0.995, "npedit.full.oracle_success": 0.5, "env.flag": 1.0}
    with pytest.raises(ValueError, match="dotted lowercase"):
        runs.record_metrics(run, {"NPEdit.Success": 1.0})
    with pytest.raises(ValueError, match="finite"):
        runs.record_metrics(run, {"a.b": float("nan")})
    with pytest.raises(TypeError, match="number"):
        runs.record_metrics(run, {"a.b": "high"})


def test_seed_summary_and_report(run):
    runs.record_metrics(run, runs.seed_summary("npedit.full.oracle_success", [0.5, 0.7, 0.6]))
    data = runs.read_metrics(run)
    assert data["npedit.full.oracle_success"] == pytest.approx(0.6)
    assert data["npedit.full.oracle_success.sd"] == pytest.approx(0.1)
    assert data["npedit.full.oracle_success.n"] == 3
    text = report.write_report(run).read_text()
    assert "| `npedit.full.oracle_success` | 0.6 ± 0.1 (n=3) |" in text


def test_a_curve_is_recorded_point_by_point_and_tabulated_by_step(run):
    history = [{"step": 0, "curve_oracle_success": 0.1, "curve_judge_yes": 0.2},
               {"step": 10, "loss": 1.0},  # not a curve point
               {"step": 300, "curve_oracle_success": 0.3, "curve_judge_yes": 0.4}]
    points = runs.curve_metrics("npedit.full", history)
    assert points == {"npedit.full.curve.step00000.judge_yes": 0.2, "npedit.full.curve.step00000.oracle_success": 0.1,
                      "npedit.full.curve.step00300.judge_yes": 0.4, "npedit.full.curve.step00300.oracle_success": 0.3}
    for key, value in points.items():  # as a seed study folds them
        runs.record_metrics(run, runs.seed_summary(key, [value - 0.05, value + 0.05]))
    runs.record_metrics(run, {"npedit.full.oracle_success": 0.25})
    text = report.write_report(run).read_text()
    curves = text.split("## Training curves", 1)[1]
    assert "| step | `judge_yes` | `oracle_success` |" in curves
    assert "| 0 | 0.2 ± 0.07071 (n=2) | 0.1 ± 0.07071 (n=2) |" in curves
    assert "| 300 | 0.4 ± 0.07071 (n=2) | 0.3 ± 0.07071 (n=2) |" in curves
    metrics_part = text.split("## Metrics", 1)[1].split("## Training curves", 1)[0]
    assert "| `npedit.full.oracle_success` | 0.25 |" in metrics_part and ".curve." not in metrics_part


def test_bad_run_id_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="RUN_ID"):
        runs.open_run("../escape")


def test_cache_builds_once_and_keys_by_config(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"w": torch.arange(4.0)}, {"loss": 0.1}

    first = cache.ensure("toy", {"steps": 2, "lr": 0.1}, build, root=tmp_path)
    again = cache.ensure("toy", {"lr": 0.1, "steps": 2}, build, root=tmp_path)  # key order irrelevant
    other = cache.ensure("toy", {"steps": 3, "lr": 0.1}, build, root=tmp_path)
    assert (first.hit, again.hit, other.hit) == (False, True, False)
    assert len(calls) == 2
    assert torch.equal(again.tensors["w"], torch.arange(4.0)) and again.meta == {"loss": 0.1}
    assert (again.path / "tensors.safetensors").exists() and not list(tmp_path.glob("toy/.*"))


def test_cache_ensure_module_restores_weights(tmp_path):
    def train(module):
        with torch.no_grad():
            module.weight.fill_(2.0)
        return {"trained": True}

    torch.manual_seed(0)
    model, art = cache.ensure_module("lin", {"n": 1}, torch.nn.Linear(3, 2), train, root=tmp_path)
    fresh, art2 = cache.ensure_module("lin", {"n": 1}, torch.nn.Linear(3, 2), train, root=tmp_path)
    assert not art.hit and art2.hit
    assert torch.equal(fresh.weight, torch.full((2, 3), 2.0))
    assert torch.equal(fresh.bias, model.bias)


def test_incomplete_cache_entry_is_rebuilt(tmp_path):
    folder = cache.artifact_dir("toy", {"a": 1}, root=tmp_path)
    folder.mkdir(parents=True)
    (folder / "tensors.safetensors").write_bytes(b"garbage")  # a crash before meta.json
    art = cache.ensure("toy", {"a": 1}, lambda: {"x": torch.ones(1)}, root=tmp_path)
    assert not art.hit and torch.equal(cache.load("toy", {"a": 1}, root=tmp_path).tensors["x"], torch.ones(1))


def test_seed_study_folds_per_seed_metrics_into_the_parent(tmp_path, monkeypatch):
    from nb_edit import cli

    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path)
    parent = runs.open_run("study")
    seed_runs = [runs.open_run(f"study.seed{k}") for k in range(3)]
    for r, value in zip(seed_runs, (0.2, 0.4, 0.9)):
        runs.record_metrics(r, {"npedit.full.oracle_success": value})
    runs.record_metrics(seed_runs[0], {"npedit.only_once.value": 1.0})
    summary = cli.aggregate_seeds(parent, seed_runs)
    stored = runs.read_metrics(parent)
    assert stored["npedit.full.oracle_success"] == pytest.approx(0.5)
    assert stored["npedit.full.oracle_success.sd"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert stored["npedit.full.oracle_success.n"] == 3
    assert summary["npedit.only_once.value.n"] == 1  # a figure one seed lacks says so in .n


@pytest.mark.bad_input
@pytest.mark.parametrize("params, needle", [({"seeds": "0,1"}, "list of integers"), ({"seeds": []}, "list of integers"),
                                            ({"seeds": [0, 1]}, "seed_notebooks")])
def test_seed_study_rejects_bad_parameters(params, needle):
    from nb_edit import cli

    with pytest.raises(SystemExit, match=needle):
        cli.seed_study(params)


def test_seed_study_parses_the_shipped_file():
    from nb_edit import cli

    seeds, books = cli.seed_study(cli.load_parameters(["papermill_runs/seeds.yaml"], []))
    assert seeds == [0, 1, 2] and books == {"05", "06", "07"}


def test_checkpoint_dir_changes_when_the_standins_are_remade(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "pretrained_dir", lambda: tmp_path / "pretrained")
    monkeypatch.setenv("NB_EDIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "pretrained" / "teacher").mkdir(parents=True)
    made_by = tmp_path / "pretrained" / "teacher" / "made_by.json"
    made_by.write_text('{"steps": 2000}')
    before = cache.checkpoint_dir("npedit", {"steps": 100})
    assert cache.checkpoint_dir("npedit", {"steps": 100}) == before  # same stand-ins, same run
    made_by.write_text('{"steps": 3000}')  # make pretrain remade the teacher
    assert cache.checkpoint_dir("npedit", {"steps": 100}) != before
