"""Command line: ``python -m nb_edit <command>``.

* ``run``    - execute every notebook in order with papermill into ``papermill_runs/<run_id>/``,
               then write the run's ``config.json`` and ``report.md`` (what ``make run`` calls);
* ``report``   - rewrite the report of an existing run (``--to docs/results.md`` for the results page);
* ``publish``  - copy a run's executed notebooks into ``notebooks/`` (what ``make notebooks`` calls);
* ``train``    - one training stage from the command line (``accelerate launch`` / ``torchrun`` ready);
* ``pretrain`` - make the tiny stand-ins for hub models shipped in ``data/pretrained/``
                 (what ``make pretrain`` calls; each part is skipped when already made);
* ``bench``    - time the project's fast paths against the plain way (``nb_edit.bench``),
                 print a table and optionally record the ``bench.*`` metrics into a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from nb_edit import __version__
from nb_edit.core import paths, runs
from nb_edit.evaluation import report
from nb_edit.notebook import outputs


def notebook_list(only: str | None = None) -> list[Path]:
    """The numbered notebooks ``NN_topic.ipynb`` in order, optionally filtered by number."""
    books = sorted(p for p in paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {w.strip().zfill(2) for w in only.split(",") if w.strip()}
        books = [b for b in books if b.name[:2] in wanted]
        if not books:
            raise SystemExit(f"--only {only!r} matched no notebook in {paths.notebooks_dir()}")
    return books


def load_parameters(files: list[str], pairs: list[list[str]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for file in files:
        path = Path(file)
        if not path.is_absolute() and not path.exists():
            path = paths.repo_root() / file
        if not path.exists():
            raise SystemExit(f"parameter file {file!r} not found; see papermill_runs/README.md.")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"parameter file {file!r} must hold a mapping of name: value.")
        params.update(loaded)
    for key, value in pairs:
        params[key] = yaml.safe_load(value)
    return params


def environment() -> dict[str, str]:
    import torch

    versions = {"nb_edit": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "peft", "bitsandbytes", "papermill"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # an optional piece that fails to import is reported, not fatal
            versions[name] = f"unavailable ({type(exc).__name__})"
    versions["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return versions


SEED_STUDY_KEYS = ("seeds", "seed_notebooks")


def seed_study(params: dict[str, Any]) -> tuple[list[int], set[str]]:
    """The seed study named in the parameters: ``seeds: [0, 1, 2]`` and ``seed_notebooks: "05,06,07"``.

    Without ``seeds`` there is none (every notebook runs once with ``seed``).
    """
    seeds = params.get("seeds")
    if seeds is None:
        return [], set()
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SystemExit(f"seeds={seeds!r}: give a non-empty list of integers, e.g. seeds: [0, 1, 2].")
    books = params.get("seed_notebooks")
    if not books:
        raise SystemExit("a seed study needs seed_notebooks: the notebooks to repeat per seed, e.g. \"05,06,07\".")
    return seeds, {str(b).strip().zfill(2) for b in str(books).split(",") if str(b).strip()}


def aggregate_seeds(parent: runs.Run, seed_runs: list[runs.Run]) -> dict[str, float]:
    """Fold the per-seed metrics into the parent run: mean under the key, ``.sd`` and ``.n`` beside.

    A key missing from some seed is summarised over the seeds that have it (``.n`` says how many).
    """
    per_seed = [runs.read_metrics(r) for r in seed_runs]
    keys = sorted({k for m in per_seed for k in m if not k.endswith((".sd", ".n"))})
    summary: dict[str, float] = {}
    for key in keys:
        summary.update(runs.seed_summary(key, [m[key] for m in per_seed if key in m]))
    runs.record_metrics(parent, summary)
    return summary


def _execute(pm, book: Path, out: Path, params: dict[str, Any], args: argparse.Namespace) -> bool:
    try:
        pm.execute_notebook(
            str(book), str(out), parameters=params, kernel_name="python3",
            cwd=str(paths.notebooks_dir()), log_output=args.log_output,
            execution_timeout=args.cell_timeout, progress_bar=False,
        )
    except pm.PapermillExecutionError as exc:
        print(f"{book.name} failed: {exc.ename}: {exc.evalue}", file=sys.stderr)
        return False
    finally:
        if out.exists():  # progress bars as their last line of text, for viewers without widgets
            outputs.clean_file(out)
    return True


def cmd_run(args: argparse.Namespace) -> int:
    """Execute the notebooks in order into ``papermill_runs/<run_id>/``, then write the report.

    With a seed study, each of ``seed_notebooks`` runs once per seed into its own run
    ``<run_id>.seed<k>``; their metrics are folded into the parent (mean, ``.sd``, ``.n``)
    before the next notebook, so the evaluation notebook sees the whole study.
    """
    import papermill as pm

    run = runs.open_run(args.run_id or runs.new_run_id())
    params = load_parameters(args.file, args.parameter)
    seeds, seed_books = seed_study(params)
    params = {k: v for k, v in params.items() if k not in SEED_STUDY_KEYS}
    params["run_id"] = run.run_id
    books = notebook_list(args.only)
    config = {"run_id": run.run_id, "parameters": params, "notebooks": [b.name for b in books],
              "environment": environment(), "timings_s": {}}
    earlier = run.dir / "config.json"
    if earlier.exists():  # more notebooks into an existing run (--only): keep what ran before
        before = json.loads(earlier.read_text())
        config["timings_s"] = before.get("timings_s", {})
        config["notebooks"] = sorted(set(before.get("notebooks", [])) | set(config["notebooks"]))
    if seeds:
        config["seed_study"] = {"seeds": seeds, "notebooks": sorted(seed_books)}
    runs.write_config(run, config)
    print(f"run {run.run_id}: {len(books)} notebooks -> {run.dir}", flush=True)
    ok = True
    for book in books:
        start = time.perf_counter()
        if book.name[:2] in seed_books:
            seed_runs = [runs.open_run(f"{run.run_id}.seed{seed}") for seed in seeds]
            for seed, seed_run in zip(seeds, seed_runs):
                print(f"== {book.name} (seed {seed})", flush=True)
                ok = _execute(pm, book, seed_run.dir / book.name, {**params, "seed": seed, "run_id": seed_run.run_id},
                              args)
                if not ok:
                    break
            if ok:
                aggregate_seeds(run, seed_runs)
        else:
            print(f"== {book.name}", flush=True)
            ok = _execute(pm, book, run.dir / book.name, params, args)
        config["timings_s"][book.name] = time.perf_counter() - start
        runs.write_config(run, config)
        if not ok:
            break
    path = report.write_report(run)
    print(f"report: {path}")
    return 0 if ok else 1


def cmd_publish(args: argparse.Namespace) -> int:
    """Copy a run's executed notebooks into notebooks/ as the committed copies with outputs."""
    run = runs.open_run(args.run_id)
    books = [book for book in notebook_list(args.only) if (run.dir / book.name).exists()]
    if not books:
        raise SystemExit(f"publish: run {args.run_id!r} holds no executed notebook; run `make notebooks` "
                         "or `python -m nb_edit run --run-id NAME` first.")
    for book in books:
        outputs.publish(run.dir / book.name, book)
        print(f"{run.dir / book.name} -> {book}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    run = runs.open_run(args.run_id)
    print(report.write_report(run, title=args.title, to=args.to))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from nb_edit.standins import pretrain  # lazy: torch and the models; `run` and `report` need neither

    pretrain.run(parts=args.only.split(",") if args.only else None, profile=args.profile,
                     force=args.force, seed=args.seed, num_threads=args.threads)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nb_edit import bench  # lazy: torch and the models; `run` and `report` need neither

    metrics, device = bench.run_cpu_benchmarks(repeats=args.repeats, warmup=args.warmup, batch_size=args.batch_size,
                                               judge_batch=args.batch_size, sampling_batch=args.batch_size,
                                               num_threads=args.threads)
    if args.gpu:
        gpu_metrics, gpu_device = bench.run_gpu_benchmarks(repeats=args.repeats, warmup=args.warmup)
        metrics.update(gpu_metrics)
        device.update({f"gpu_{k}": v for k, v in gpu_device.items()})
    print(bench.format_table(metrics))
    print("device: " + ", ".join(f"{k}={v}" for k, v in device.items()))
    if args.run_id:
        run = runs.open_run(args.run_id)
        runs.record_metrics(run, metrics)
        print(f"recorded {len(metrics)} metrics into {run.metrics_path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from nb_edit.core.config import RunSettings  # lazy: as above
    from nb_edit.data.world_datasets import shapesworld  # lazy: as above

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():  # launched by accelerate launch / torchrun
        dist.init_process_group("nccl" if __import__("torch").cuda.is_available() else "gloo")
    try:
        overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
        if args.stage != "npedit":
            raise SystemExit(f"train: stage {args.stage!r} has no command yet; use npedit.")
        from nb_edit.methods.npedit.train import NPEditConfig, train_npedit  # lazy: as above
        from nb_edit.methods.registry import run_dir  # lazy: as above

        cfg = NPEditConfig.for_profile(args.profile, **overrides)
        settings = RunSettings.for_profile(args.profile)
        if distributed:  # process 0 builds the datasets once; the others read them after it
            if dist.get_rank() == 0:
                shapesworld(settings, seed=0)
            dist.barrier()
        data = shapesworld(settings, seed=0)
        ckpt = run_dir("npedit", cfg, data["root"])
        _, history = train_npedit(cfg, data["unpaired"], Path(args.ckpt_dir) if args.ckpt_dir else ckpt)
        warm = sum("loss_copy" in h for h in history)
        print(f"train npedit: {len(history) - warm} steps after {warm} copy warm-up steps, last loss_vlm "
              f"{history[-1].get('loss_vlm')}, loss_dmd {history[-1].get('loss_dmd')}")
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nb_edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks headlessly into a run folder")
    run.add_argument("--run-id", default="", help="folder name under papermill_runs/ (default: date-time)")
    run.add_argument("-f", "--file", action="append", default=[], help="YAML parameter file (repeatable)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    run.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,01")
    run.add_argument("--cell-timeout", type=int, default=3600)
    run.add_argument("--log-output", action="store_true", help="stream cell outputs to the terminal")
    run.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="rewrite report.md of a run")
    rep.add_argument("--run-id", required=True)
    rep.add_argument("--to", default=None, help="write it to this file instead, e.g. docs/results.md")
    rep.add_argument("--title", default=None, help="the report's heading (default: the run id)")
    rep.set_defaults(func=cmd_report)
    pub = sub.add_parser("publish", help="copy a run's executed notebooks into notebooks/ (the committed outputs)")
    pub.add_argument("--run-id", required=True)
    pub.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,01")
    pub.set_defaults(func=cmd_publish)
    pre = sub.add_parser("pretrain", help="make the shipped tiny stand-ins (teacher, editors, judge)")
    pre.add_argument("--only", default=None, help="comma-separated parts: teacher,clean,noisy,judge")
    pre.add_argument("--profile", default="tiny", help="tiny (shipped sizes) or smoke (seconds, for tests)")
    pre.add_argument("--force", action="store_true", help="remake parts that already exist")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default 2; 1 is faster when the cores are shared)")
    pre.set_defaults(func=cmd_pretrain)
    ben = sub.add_parser("bench", help="benchmarks against the plain way (NP-Edit step, judge, sampling)")
    ben.add_argument("--run-id", default="", help="record the bench.* metrics into papermill_runs/<run_id>/")
    ben.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the median is kept)")
    ben.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    ben.add_argument("--batch-size", type=int, default=16, help="batch of the NP-Edit step, judge and sampler")
    ben.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ben.add_argument("--gpu", action="store_true", help="also the real-size GPU benchmarks (needs CUDA)")
    ben.set_defaults(func=cmd_bench)
    tr = sub.add_parser("train", help="run one training stage (accelerate launch / torchrun ready)")
    tr.add_argument("stage", choices=["npedit"])
    tr.add_argument("--profile", default="tiny")
    tr.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="config override")
    tr.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: keyed in the cache)")
    tr.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    return args.func(args)
