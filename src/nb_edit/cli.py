"""Command line: ``python -m nb_edit <command>``.

* ``run``    - execute every notebook in order with papermill into ``papermill_runs/<run_id>/``,
               then write the run's ``config.json`` and ``report.md`` (what ``make run`` calls).
               Every parameter is checked against the notebooks' parameters cells first; a run id
               that already holds a run is refused unless ``--resume`` (same parameters, more
               notebooks) or ``--overwrite`` is given;
* ``report``   - rewrite the report of an existing run (``--to docs/results.md`` for the results page);
* ``publish``  - copy a run's executed notebooks into ``notebooks/`` (what ``make notebooks`` calls);
* ``train``    - one run of ``npedit``, ``multireward`` or ``mtrl`` (``accelerate launch`` / ``torchrun``
               ready); every ``--set NAME=VALUE`` is checked against the stage's config before
               anything loads; a killed run resumes from its newest checkpoint when started again;
* ``pretrain`` - make the tiny stand-ins for hub models shipped in ``data/pretrained/``
                 (what ``make pretrain`` calls; each part is skipped when already made);
* ``competence`` - how good a folder of stand-ins is at its world (``standins.competence``): the
                 copy baseline, the editors' oracle success per edit type, the teacher's caption
                 match and the judge's held-out accuracy, each with its interval, as JSON;
* ``export``   - a run's LoRA as diffusers LoRA weights that the stock pipeline's
                 ``load_lora_weights`` reads (Multi-Reward's condition module beside them);
* ``bench``    - time the project's fast paths against the plain way (``nb_edit.bench``),
                 print a table and optionally record the ``bench.*`` metrics into a run;
* ``gpu-check`` - the three trainers at real sizes with random weights on one GPU: step time and
                 peak memory (``gpu_check.*``), ``--size tiny`` for the same code on a CPU.

A bad input (an unknown parameter, a value of the wrong type, a run id in use...) ends the
command with a message naming it and the fix on stderr, and exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from nb_edit import __version__
from nb_edit.core import paths, runs
from nb_edit.core.config import PROFILE_NAMES, RunSettings, TypeMismatch, closest, coerce_value, parse_overrides
from nb_edit.core.validation import BadInputError
from nb_edit.evaluation import report
from nb_edit.notebook import outputs


def notebook_list(only: str | None = None) -> list[Path]:
    """The numbered notebooks ``NN_topic.ipynb`` in order, optionally filtered by number."""
    books = sorted(p for p in paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {w.strip().zfill(2) for w in only.split(",") if w.strip()}
        books = [b for b in books if b.name[:2] in wanted]
        if not books:
            numbers = ", ".join(p.name[:2] for p in paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
            raise BadInputError(f"--only {only!r}", f"matched no notebook in {paths.notebooks_dir()}",
                                f"give comma-separated notebook numbers among {numbers}")
    return books


def load_parameters(files: list[str], pairs: list[list[str]],
                    origins: dict[str, str] | None = None) -> dict[str, Any]:
    """The notebook parameters of YAML files (in order) and ``-p NAME VALUE`` pairs (last wins);
    ``origins``, if given, receives where each name came from, for error messages."""
    params: dict[str, Any] = {}
    origins = origins if origins is not None else {}
    for file in files:
        path = Path(file)
        if not path.is_absolute() and not path.exists():
            path = paths.repo_root() / file
        if not path.is_file():
            raise BadInputError(f"-f {file}", "parameter file not found",
                                "check the path; the shipped ones are papermill_runs/*.yaml (papermill_runs/README.md)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise BadInputError(f"-f {file}", f"not valid YAML ({error})", "fix the line it names") from None
        if not isinstance(loaded, dict):
            raise BadInputError(f"-f {file}", f"holds a {type(loaded).__name__}, not a mapping",
                                "write one `name: value` per line")
        params.update(loaded)
        origins.update({str(key): f"from {file}" for key in loaded})
    for key, value in pairs:
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise BadInputError(f"-p {key} {value}", "the value is not valid YAML",
                                "quote it, e.g. -p NAME '\"text\"', or fix its brackets") from None
        origins[key] = f"-p {key} {value}"
    return params


# papermill's inferred type names (from the annotation) -> the type a given value must have
NOTEBOOK_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}


def declared_type(info: dict[str, Any]) -> type | None:
    """The type a notebook declares for a parameter: its annotation, else the type of its literal
    default (papermill says "None" for an unannotated one); None when neither tells (a default
    of None, an annotation such as ``int | None``): then the notebook decides."""
    name = str(info.get("inferred_type_name", "None")).strip()
    if name in NOTEBOOK_TYPES:
        return NOTEBOOK_TYPES[name]
    if name != "None":
        return None
    try:
        default = ast.literal_eval(str(info.get("default", "None")))
    except (ValueError, SyntaxError):
        return None
    return NOTEBOOK_TYPES.get(type(default).__name__) if default is not None else None


def notebook_parameters(books: list[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """Notebook file name -> its parameters cell as papermill reads it (name -> type, default)."""
    import papermill as pm  # lazy: papermill and its kernel machinery load slowly; only `run` needs them

    return {book.name: pm.inspect_notebook(str(book)) for book in books}


def check_notebook_parameters(params: dict[str, Any], books: list[Path], origins: dict[str, str] | None = None,
                              resume: bool = False) -> dict[str, Any]:
    """Check the parameters against the parameters cells of ``books``; return them converted
    (an int where a float is declared, a float written as text).

    papermill passes a parameter a notebook does not declare without a word, so a misspelt one
    would run the whole pipeline on defaults: a name that no notebook declares is an error, and
    so is a value whose type differs from the one a notebook declares for it. A name that only
    notebooks outside ``books`` declare is an error when given with ``-p`` (it would do nothing),
    but only a note when it comes from a parameter file (the shipped ones serve the whole
    pipeline, and ``--only`` picks a part of it) or when resuming (a run keeps one set of
    parameters for all its notebooks).
    """
    declared = notebook_parameters(books)
    origins = origins or {}
    everywhere: dict[str, dict[str, dict[str, Any]]] = {}
    checked = dict(params)
    for name, value in params.items():
        origin = origins.get(name, "given")
        where = f"parameter {name!r} ({origin})"
        if name == "run_id":
            raise BadInputError(where, "the runner sets run_id itself", "use --run-id NAME instead")
        takers = {book: cell[name] for book, cell in declared.items() if name in cell}
        if not takers:
            everywhere = everywhere or notebook_parameters(notebook_list())
            takers = {book: cell[name] for book, cell in everywhere.items() if name in cell}
            selected = [b.name for b in books]
            if not takers:
                raise BadInputError(where, *_unknown_parameter(name, everywhere))
            if not resume and origin.startswith("-p "):
                raise BadInputError(where, f"none of the selected notebooks ({', '.join(selected)}) declares it; "
                                    f"it is a parameter of {', '.join(takers)}",
                                    "add one of those to --only, or leave the parameter out")
            if not resume:
                print(f"note: parameter {name!r} ({origin}) is for {', '.join(takers)}, which this run does not "
                      "execute", file=sys.stderr)
        for book, info in takers.items():
            hint = declared_type(info)
            if hint is None:
                continue
            try:
                value = coerce_value(value, hint)
            except TypeMismatch:
                quote = " (quote text that looks like a number or a bool: -p NAME '\"123\"')" if hint is str else ""
                raise BadInputError(where, f"{book} declares {name}: {hint.__name__} = {info.get('default')}, got "
                                    f"{value!r} ({type(value).__name__})",
                                    f"pass {'an' if hint.__name__[0] in 'aeiou' else 'a'} {hint.__name__}, "
                                    f"e.g. -p {name} {info.get('default')}{quote}") from None
        if name == "profile" and value not in PROFILE_NAMES:
            near = closest(value, PROFILE_NAMES)
            raise BadInputError(where, f"{value!r} is not a profile" + (f" (did you mean {near!r}?)" if near else ""),
                                f"use one of {', '.join(PROFILE_NAMES)}")
        checked[name] = value
    return checked


def _unknown_parameter(name: str, everywhere: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(problem, fix) for a parameter that no notebook declares: the closest name and its notebooks."""
    known = sorted({p for cell in everywhere.values() for p in cell} - {"run_id"})
    near = closest(name, known)
    hint = ""
    if near:
        takers = [book for book, cell in everywhere.items() if near in cell]
        hint = f" (did you mean {near!r}? {', '.join(takers)} take{'s' if len(takers) == 1 else ''} it)"
    return (f"no notebook declares this parameter{hint}",
            f"use a name from the notebooks' parameters cells: {', '.join(known)}")


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
    runs.merge_items(parent, seed_runs)  # every seed's per-item scores, for the claims' paired tests
    return summary


def _execute(pm, book: Path, out: Path, params: dict[str, Any], args: argparse.Namespace) -> bool:
    try:
        pm.execute_notebook(
            str(book), str(out), parameters=params, kernel_name="python3",
            cwd=str(paths.notebooks_dir()), log_output=args.log_output,
            execution_timeout=args.cell_timeout or None, progress_bar=False,  # 0: no limit
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

    Everything that can be checked is checked before the run folder is touched: the parameter
    files, each parameter against the selected notebooks' parameters cells, ``--only``, the run
    id and whether its folder already holds a run (see :func:`nb_edit.core.runs.claim_run`). A
    run that fails before writing any output removes the folders it created.

    With a seed study, each of ``seed_notebooks`` runs once per seed into its own run
    ``<run_id>.seed<k>``; their metrics are folded into the parent (mean, ``.sd``, ``.n``)
    before the next notebook, so the evaluation notebook sees the whole study.
    """
    import papermill as pm  # lazy: papermill and its kernel machinery load slowly; only `run` needs them

    run_id = runs.run_path(args.run_id or runs.new_run_id()).name
    origins: dict[str, str] = {}
    params = load_parameters(args.file, args.parameter, origins)
    seeds, seed_books = seed_study(params)
    params = {k: v for k, v in params.items() if k not in SEED_STUDY_KEYS}
    books = notebook_list(args.only)
    params = check_notebook_parameters(params, books, origins, resume=args.resume)
    params["run_id"] = run_id
    seed_info = {"seeds": seeds, "notebooks": sorted(seed_books)} if seeds else None
    settings = {**params, **({"seed_study": seed_info} if seed_info else {})}
    run, created = runs.claim_run(run_id, settings, resume=args.resume, overwrite=args.overwrite,
                                  related=[f"{run_id}.seed{seed}" for seed in seeds])
    if args.resume and run.dir in created:
        print(f"run {run_id}: nothing to resume, starting it", file=sys.stderr)
    try:
        return _run_notebooks(pm, run, books, params, seeds, seed_books, seed_info, args)
    except BaseException:
        removed = runs.release_unused(created)
        if removed:
            print(f"run {run_id} failed before writing any output; removed {', '.join(map(str, removed))}",
                  file=sys.stderr)
        raise


def _run_notebooks(pm, run: runs.Run, books: list[Path], params: dict[str, Any], seeds: list[int],
                   seed_books: set[str], seed_info: dict[str, Any] | None, args: argparse.Namespace) -> int:
    config = {"run_id": run.run_id, "parameters": params, "notebooks": [b.name for b in books],
              "environment": environment(), "timings_s": {}}
    earlier = run.dir / "config.json"
    if earlier.exists():  # --resume (claim_run checked the parameters): keep what ran before
        before = json.loads(earlier.read_text())
        config["timings_s"] = before.get("timings_s", {})
        config["notebooks"] = sorted(set(before.get("notebooks", [])) | set(config["notebooks"]))
    if seed_info:
        config["seed_study"] = seed_info
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
    run = runs.existing_run(args.run_id, "publish")
    books = [book for book in notebook_list(args.only) if (run.dir / book.name).exists()]
    if not books:
        raise SystemExit(f"publish: run {args.run_id!r} holds no executed notebook; run `make notebooks` "
                         "or `python -m nb_edit run --run-id NAME` first.")
    for book in books:
        outputs.publish(run.dir / book.name, book)
        print(f"{run.dir / book.name} -> {book}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    run = runs.existing_run(args.run_id, "report")
    print(report.write_report(run, title=args.title, to=args.to))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from nb_edit.standins import editors, judge, pretrain  # lazy: torch and the models; `run` and `report` need neither

    pretrain.run(parts=args.only.split(",") if args.only else None, profile=args.profile,
                 force=args.force, seed=args.seed, num_threads=args.threads, world_name=args.world,
                 root=Path(args.to) if args.to else None,
                 overrides=parse_overrides(editors.PretrainConfig, args.set),
                 judge_overrides=parse_overrides(judge.JudgeConfig, args.judge_set, option="--judge-set"))
    return 0


def cmd_competence(args: argparse.Namespace) -> int:
    from nb_edit import world  # lazy: torch and the models; `run` and `report` need none of it
    from nb_edit.core.runtime import torch_threads  # lazy: as above
    from nb_edit.standins import competence  # lazy: as above

    world_cfg = world.preset(args.world or RunSettings.for_profile("tiny").world)
    folder = Path(args.source) if args.source else paths.pretrained_dir()
    with torch_threads(args.threads or RunSettings().num_threads):
        metrics = competence.measure(folder, world_cfg, n=args.n, seed=args.seed, steps=args.steps,
                                     guidance=args.guidance)
    text = json.dumps(metrics, indent=1, sort_keys=True)
    if args.json:
        Path(args.json).write_text(text)
    for key in sorted(metrics):
        if not key.endswith((".ci_low", ".ci_high")):
            low, high = metrics.get(f"{key}.ci_low"), metrics.get(f"{key}.ci_high")
            print(f"{key}: {metrics[key]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nb_edit.methods.export import export_checkpoint  # lazy: torch, diffusers, peft

    print(export_checkpoint(args.checkpoint, args.to, adapter_name=args.adapter, use_ema=args.ema))
    return 0


def _show_and_record(table: str, metrics: dict[str, float], device: dict[str, str], run_id: str | None) -> None:
    """Print a benchmark's table and device, and record its figures into run ``run_id`` if given."""
    print(table)
    print("device: " + ", ".join(f"{k}={v}" for k, v in device.items()))
    if run_id:
        run = runs.open_run(run_id)
        runs.record_metrics(run, metrics)
        print(f"recorded {len(metrics)} metrics into {run.metrics_path}")


def cmd_bench(args: argparse.Namespace) -> int:
    from nb_edit import bench  # lazy: torch and the models; `run` and `report` need neither

    metrics, device = bench.run_cpu_benchmarks(repeats=args.repeats, warmup=args.warmup, batch_size=args.batch_size,
                                               judge_batch=args.batch_size, sampling_batch=args.batch_size,
                                               num_threads=args.threads)
    if args.gpu:
        gpu_metrics, gpu_device = bench.run_gpu_benchmarks(repeats=args.repeats, warmup=args.warmup)
        metrics.update(gpu_metrics)
        device.update({f"gpu_{k}": v for k, v in gpu_device.items()})
    _show_and_record(bench.format_table(metrics), metrics, device, args.run_id)
    return 0


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from nb_edit import bench  # lazy: torch and the models; `run` and `report` need neither

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    overrides = {"quantization": None} if args.size == "tiny" and not __import__("torch").cuda.is_available() else None
    metrics, device = bench.run_gpu_trainer_check(scratch, size=args.size, steps=args.steps, overrides=overrides)
    if not metrics:
        print(f"gpu-check: skipped ({device.get('skipped')})")
        return 1
    _show_and_record(bench.format_table(metrics), metrics, device, args.run_id)
    return 0


def train_config(stage: str, profile: str, items: list[str], world_cfg=None):
    """The stage's config with the ``--set NAME=VALUE`` items, checked against its fields and
    types (:func:`nb_edit.core.config.parse_overrides`), on the data of ``world_cfg`` (None: the
    config's default world, enough to check the items); raises :class:`BadInputError`."""
    from nb_edit.methods.registry import STAGE_CONFIGS, stage_config  # lazy: torch and the models; `run` needs neither

    if stage not in STAGE_CONFIGS:
        raise BadInputError(f"train {stage}", "there is no such stage", f"use one of {', '.join(STAGE_CONFIGS)}")
    overrides = parse_overrides(STAGE_CONFIGS[stage], items)
    try:  # an explicit `--set x=null` sets None (registry.stage_config), not "the profile's value"
        return stage_config(stage, profile, overrides, world_cfg=world_cfg)
    except (TypeError, ValueError) as error:  # the config's own checks (e.g. an unknown variant)
        given = " ".join([f"--profile {profile}"] + [f"--set {item}" for item in items])
        raise BadInputError(f"train {stage} {given}", str(error).rstrip("."), "change the value it names") from None


def cmd_train(args: argparse.Namespace) -> int:
    # before torch.distributed, the data or any model: a bad --set fails in a second, not after the warm-up
    cfg = train_config(args.stage, args.profile, args.set)

    import torch.distributed as dist  # lazy: torch; `run` and `report` need none of it

    from nb_edit.data.world_datasets import shapesworld  # lazy: as above
    from nb_edit.methods.registry import train_stage  # lazy: as above

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():  # launched by accelerate launch / torchrun
        dist.init_process_group("nccl" if __import__("torch").cuda.is_available() else "gloo")
    try:
        settings = RunSettings.for_profile(args.profile)
        if distributed:  # process 0 builds the datasets once; the others read them after it
            if dist.get_rank() == 0:
                shapesworld(settings, seed=0)
            dist.barrier()
        data = shapesworld(settings, seed=0)
        cfg = train_config(args.stage, args.profile, args.set, world_cfg=data["world_cfg"])  # on the data's world
        _, history = train_stage(args.stage, cfg, data, Path(args.ckpt_dir) if args.ckpt_dir else None)
        warm = sum("loss_copy" in h for h in history)
        last = {k: round(float(v), 6) for k, v in history[-1].items() if k.startswith("loss")} if history else {}
        print(f"train {args.stage}: {len(history) - warm} steps" + (f" after {warm} copy warm-up steps" if warm else "")
              + f", last {last}")
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _show_project_log() -> None:
    """The project's own INFO lines (a resume, a fallback) on stderr; other libraries keep theirs."""
    logger = logging.getLogger("nb_edit")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nb_edit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the notebooks headlessly into a run folder")
    run.add_argument("--run-id", default="", help="folder name under papermill_runs/ (default: date-time)")
    run.add_argument("-f", "--file", action="append", default=[], help="YAML parameter file (repeatable)")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    run.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,01")
    run.add_argument("--cell-timeout", type=int, default=0, metavar="SECONDS",
                     help="stop a cell that runs longer than this; 0 (default) sets no limit, since one training "
                          "cell runs for hours in a seed study or at full scale (its checkpoints resume it)")
    run.add_argument("--log-output", action="store_true", help="stream cell outputs to the terminal")
    reuse = run.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true",
                       help="run (more) notebooks into an existing run; refused unless its parameters are the same")
    reuse.add_argument("--overwrite", action="store_true",
                       help="delete an existing run of this id (and its .seed<k> runs) before running")
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
    pre.add_argument("--world", default=None, help="the ladder's world to pretrain on (toy, small, rich; "
                     "default: the profile's)")
    pre.add_argument("--to", default=None, help="folder to write the stand-ins into (default data/pretrained)")
    pre.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default 2; 1 is faster when the cores are shared)")
    pre.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="a PretrainConfig setting of the teacher and editors, e.g. --set editor_steps=6000 "
                          "--set unet_blocks=[32,64,64] (repeatable)")
    pre.add_argument("--judge-set", action="append", default=[], metavar="NAME=VALUE",
                     help="a JudgeConfig setting of the judge, e.g. --judge-set qa_steps=4000 (repeatable)")
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
    tr.add_argument("stage", choices=["npedit", "multireward", "mtrl"],
                    help="npedit (NP-Edit), multireward (Multi-Reward as Condition), mtrl (MT-EditFlow)")
    tr.add_argument("--profile", default="tiny", choices=PROFILE_NAMES)
    tr.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="config setting (repeatable), checked against the stage's config before anything loads")
    tr.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: keyed in the cache)")
    tr.set_defaults(func=cmd_train)
    gpu = sub.add_parser("gpu-check", help="the three trainers at real sizes with random weights on one GPU: "
                         "step time and peak memory")
    gpu.add_argument("--scratch", required=True, help="folder for the random models (about 55 GB at real size)")
    gpu.add_argument("--size", default="real", choices=["real", "tiny"], help="tiny: the same code on small models")
    gpu.add_argument("--steps", type=int, default=2, help="training steps per trainer")
    gpu.add_argument("--run-id", default=None, help="also record the figures into papermill_runs/<run-id>/metrics.json")
    gpu.set_defaults(func=cmd_gpu_check)
    com = sub.add_parser("competence", help="how good a folder of stand-ins is at its world (before any method)")
    com.add_argument("--world", default=None, help="the ladder's world (toy, small, rich; default: the profile's)")
    com.add_argument("--from", dest="source", default=None, help="stand-ins folder (default data/pretrained)")
    com.add_argument("--n", type=int, default=512, help="held-out edits (default 512)")
    com.add_argument("--seed", type=int, default=0)
    com.add_argument("--steps", type=int, default=4, help="sampling steps (default 4, NP-Edit's few-step setting)")
    com.add_argument("--guidance", type=float, default=2.0, help="teacher's guidance (default 2, DMD's real score)")
    com.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    com.add_argument("--json", default=None, help="also write the figures to this JSON file")
    com.set_defaults(func=cmd_competence)
    exp = sub.add_parser("export", help="write a run's LoRA for the stock diffusers pipelines (load_lora_weights)")
    exp.add_argument("checkpoint", help="a run's checkpoint folder (holding step_* folders) or one step_* folder")
    exp.add_argument("--to", required=True, help="output folder: pytorch_lora_weights.safetensors (+ reward condition)")
    exp.add_argument("--adapter", default=None, help="LoRA adapter (default: generator, policy or the only one)")
    exp.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with ema_decay)")
    exp.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    _show_project_log()
    try:
        return args.func(args)
    except BadInputError as error:  # the user's input, not the code: a message, not a traceback
        print(f"python -m nb_edit {args.command}: {error}", file=sys.stderr)
        return 2
