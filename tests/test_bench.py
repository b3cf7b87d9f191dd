"""nb_edit.bench at toy repeat counts: every key present and sane (no timing assertions)."""

import math

import pytest
import torch

from nb_edit import bench

KEYS = ("bench.npedit_step_s", "bench.npedit_peak_mem_mb", "bench.judge_yesno_per_s", "bench.judge_generate_per_s",
        "bench.judge_prefix_reuse_per_s", "bench.sampling_images_per_s")


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return bench.make_random_standins(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="module")
def measured(standins):
    root = standins["teacher"].parent  # make_random_standins writes the same random models again
    return bench.run_cpu_benchmarks(repeats=1, warmup=0, batch_size=2, judge_batch=2, sampling_batch=2,
                                    num_threads=1, root=root, progress=None)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared: more threads only thrash
    yield
    torch.set_num_threads(previous)


def test_cpu_benchmarks_return_every_key_with_positive_finite_numbers(measured):
    metrics, device = measured
    expected = {f"{key}{suffix}" for key in KEYS for suffix in ("", ".baseline", ".speedup")}
    assert set(metrics) == expected
    for key, value in metrics.items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    for key in KEYS:  # the speedup is the ratio of the two numbers beside it, in the better direction
        lower_is_better = not key.endswith("_per_s")
        ratio = (metrics[f"{key}.baseline"] / metrics[key]) if lower_is_better else metrics[key] / metrics[f"{key}.baseline"]
        assert metrics[f"{key}.speedup"] == pytest.approx(ratio)
    assert device["device"] == "cpu" and all(isinstance(v, str) for v in device.values())
    assert not any(key.startswith("bench.device") for key in metrics)  # device info is kept apart
    # three full models and fp32 Adam states cannot take less memory than one base with adapters
    assert metrics["bench.npedit_peak_mem_mb.baseline"] > metrics["bench.npedit_peak_mem_mb"]


def test_table_lists_each_benchmark_once(measured):
    table = bench.format_table(measured[0]).splitlines()
    assert len(table) == 1 + len(KEYS) and all(any(row.startswith(k) for row in table) for k in KEYS)


def test_full_copies_baseline_does_the_same_math_at_initialisation(standins, one_thread):
    """LoRA starts at zero, so at step 0 both trainers' generator, fake and teacher are the teacher."""
    cfg = bench.NPEditConfig(teacher_id=str(standins["teacher"]), judge_id=str(standins["judge"]), batch_size=2,
                             n_aux=1, curve_every=0)
    data = bench.UnpairedEdits(4)
    outs = []
    for full_copies in (False, True):
        trainer, _, params = bench._npedit_setup(full_copies, cfg, data, torch.device("cpu"))
        n_model = sum(p.numel() for p in trainer.model.editors["generator"].parameters()) if full_copies else None
        outs.append((trainer.step(trainer.batch(0), 0), sum(p.numel() for p in params), n_model))
    (lora, n_lora, _), (full, n_full, n_generator) = outs
    for key in ("loss_vlm", "loss_dmd", "grad_vlm", "grad_dmd"):
        assert float(lora[key]) == pytest.approx(float(full[key]), rel=1e-4, abs=1e-6), key
    assert n_full == n_generator > 5 * n_lora  # the baseline trains every weight of the generator


def test_peak_memory_counts_resident_tensors_and_the_step_peak():
    held = torch.nn.Linear(512, 512)  # 1 MiB of weights + 2 KiB bias

    def allocate():
        scratch = torch.ones(4 * 2**20 // 4)  # 4 MiB, freed at return
        return float(scratch.sum())

    peak = bench.peak_memory_mb(allocate, [held], torch.device("cpu"))
    assert 5.0 <= peak < 5.5
    shared = torch.nn.Linear(512, 512)
    twice = torch.nn.ModuleList([shared, shared])
    assert bench.held_tensor_bytes(twice) == bench.held_tensor_bytes(shared)


def test_helpers_refuse_bad_input_and_pick_the_right_peak():
    with pytest.raises(ValueError, match="repeats"):
        bench.median_seconds(lambda: None, repeats=0, warmup=0, device=torch.device("cpu"))
    assert bench.bf16_peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert bench.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bench.bf16_peak_flops("Some Unknown Card") is None
    # a frozen base skips the weight gradients: 4 N T instead of 6 N T for the linear layers
    assert bench.dit_step_flops(10, 3, layers=0, width=1) == 120
    assert bench.dit_step_flops(10, 3, layers=0, width=1, frozen_base=False) == 180


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_benchmarks_skip_cleanly_without_cuda():
    metrics, info = bench.run_gpu_benchmarks(progress=None)
    assert metrics == {} and "CUDA" in info["skipped"]


def test_cli_bench_prints_and_records_into_a_run(measured, monkeypatch, tmp_path, capsys):
    from nb_edit import cli
    from nb_edit.core import paths, runs

    monkeypatch.setattr(bench, "run_cpu_benchmarks", lambda **kwargs: (dict(measured[0]), dict(measured[1])))
    monkeypatch.setattr(paths, "runs_dir", lambda: tmp_path)
    assert cli.main(["bench", "--run-id", "bench_test", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "bench.npedit_step_s" in out and "device: device=cpu" in out
    recorded = runs.read_metrics(runs.open_run("bench_test"))
    assert recorded == pytest.approx(measured[0])
