"""``make pretrain``: every tiny stand-in, in dependency order, into ``data/pretrained/``.

teacher -> supervised editors (clean, noisy; initialised from the teacher) -> judge (its last two
stages question the editors' outputs). Each part
is skipped when its folder is complete (``made_by.json`` is written last) unless ``force``;
an interrupted part resumes from its checkpoints in ``data/cache/pretrain/<part>/<config key>/``
(a changed configuration starts afresh instead of resuming someone else's weights). The training
summaries are merged into ``data/pretrained/pretrain_metrics.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nb_edit import world
from nb_edit.core import cache, paths
from nb_edit.core.config import RunSettings
from nb_edit.core.runtime import torch_threads
from nb_edit.core.validation import BadInputError
from nb_edit.standins import editors, judge

PARTS = ("teacher", "clean", "noisy", "judge")


def part_dir(name: str, root: Path | None = None) -> Path:
    return (root or paths.pretrained_dir()) / name


def is_complete(folder: Path) -> bool:
    return (folder / "made_by.json").exists()


def made_for(folder: str | Path) -> world.WorldConfig | None:
    """The world a stand-in folder was made for (its ``made_by.json``), or None for any other model."""
    made_by = Path(folder) / "made_by.json"
    if not made_by.is_file():
        return None
    data = json.loads(made_by.read_text()).get("config", {}).get("world")
    return world.WorldConfig.from_dict(data) if data else None


def check_world(world_cfg: world.WorldConfig, *folders: str | Path) -> None:
    """Refuse stand-ins made for another world than ``world_cfg``: an editor or judge of the rich
    world scored on the small one (or the other way round) gives numbers that mean nothing.
    Folders that are not stand-ins (hub ids, a user's own models) are not checked."""
    for folder in folders:
        made = made_for(folder) if Path(folder).is_dir() else None
        if made is not None and made != world_cfg:
            name = next((n for n, v in world.WORLDS.items() if world.preset(n) == made), "another world")
            raise BadInputError(folder, f"this stand-in was made for the world {name!r}, not the run's",
                                f"make the stand-ins for the run's world (python -m nb_edit pretrain --world <name> "
                                f"--force), or run on the world {name!r} (world_name={name!r})")


def _record(root: Path, name: str, summary: dict) -> None:
    """Merge one part's summary into ``pretrain_metrics.json`` (locked: parts may train in parallel)."""
    import fcntl

    path = root / "pretrain_metrics.json"
    with open(root / ".pretrain_metrics.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = {k: v for k, v in summary.items() if k != "loss_curve"}
        path.write_text(json.dumps(data, indent=2, sort_keys=True))


def run(parts: list[str] | None = None, profile: str = "tiny", force: bool = False, seed: int = 0,
        root: Path | None = None, num_threads: int | None = None, world_name: str | None = None,
        overrides: dict | None = None, judge_overrides: dict | None = None) -> None:
    """Make ``parts`` (default all) for the ladder's world ``world_name`` (default the profile's,
    ``RunSettings.world``); ``overrides`` are ``PretrainConfig`` settings of the teacher and the
    editors, ``judge_overrides`` ``JudgeConfig`` settings of the judge (the CLI's ``--set`` and
    ``--judge-set``, checked by ``core.config.parse_overrides``)."""
    root = root or paths.pretrained_dir()
    world_dict = world.preset(world_name or RunSettings.for_profile(profile).world).to_dict()
    for given in (overrides or {}), (judge_overrides or {}):
        if "world" in given:
            raise SystemExit("pretrain: the world is chosen by name (--world toy|small|rich, world/config.py "
                             "WORLDS), not by --set world=...; add a preset there for another world.")
    common = dict(seed=seed, num_threads=num_threads, world=world_dict)
    unknown = set(parts or ()) - set(PARTS)
    if unknown:
        raise SystemExit(f"pretrain: unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}.")
    ckpt_root = paths.cache_dir() / "pretrain" / profile
    for name in parts or PARTS:
        out = part_dir(name, root)
        if is_complete(out) and not force:
            print(f"pretrain: {name} already made ({out}); --force remakes it")
            continue
        # built in a staging folder that replaces ``out`` only when complete: a remade part never
        # mixes old and new files (say a DiT's transformer/ beside a UNet's unet/), and an
        # interrupted remake leaves the previous part in place
        staging = out.parent / f".{name}.partial"
        if name == "judge":
            cfg = judge.JudgeConfig.for_profile(profile, **{**common, **(judge_overrides or {})})
        else:
            cfg = editors.PretrainConfig.for_profile(profile, **{**common, **(overrides or {})})
        # threads change speed, not results: they stay out of the checkpoint key
        ckpt = ckpt_root / name / cache.config_key({**cfg.to_dict(), "num_threads": None, "part": name})
        if force:
            shutil.rmtree(ckpt, ignore_errors=True)
        teacher = part_dir("teacher", root)
        if name in ("clean", "noisy") and not is_complete(teacher):
            raise SystemExit(f"pretrain: {name} starts from the teacher, which is not made yet; "
                             "run `make pretrain` (or --only teacher) first.")
        if name == "judge" and cfg.editor_share > 0:
            missing = [e for e in cfg.editors if not is_complete(part_dir(e, root))]
            if missing:
                raise SystemExit(f"pretrain: the judge's feedback stage draws outputs of the editors {missing}, "
                                 "which are not made yet; run `make pretrain` (or `python -m nb_edit pretrain --only clean,noisy`) first.")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        print(f"pretrain: {name} -> {out}", flush=True)
        with torch_threads(cfg.num_threads):
            if name == "judge":
                summary = judge.train_judge(cfg, staging, ckpt, editors_root=root)
            elif name == "teacher":
                summary = editors.train_teacher(cfg, staging, ckpt)
            else:
                summary = editors.train_supervised_editor(cfg, teacher, staging, ckpt, noisy=(name == "noisy"))
        editors.write_made_by(staging, name, cfg, summary)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        _record(root, name, summary)
        print(f"pretrain: {name} done in {summary['wall_s']:.0f} s, final loss {summary['final_loss']:.4f}")
