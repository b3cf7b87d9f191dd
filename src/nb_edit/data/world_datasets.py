"""The ShapesWorld datasets of one run size, built once and found again by every notebook.

``shapesworld(settings, seed)`` returns the curated unpaired set (NP-Edit), clean and noisy
paired sets, multi-turn sequences and the held-out test set, built under
``data/cache/shapesworld/<key>/`` where ``key`` hashes the sizes, the world and the validity
filter. The curation metrics are kept beside them (``curation.json``). A notebook that runs
alone from a fresh kernel therefore trains on exactly the data an earlier notebook curated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nb_edit import world
from nb_edit.core import cache, paths
from nb_edit.data.curation import ValidityFilter
from nb_edit.data.store import read_dataset
from nb_edit.data.synthetic import build_multiturn, build_paired, build_test_set, build_unpaired

DONE = "complete.json"


def dataset_root(settings: Any, seed: int, filter_name: str, cfg: world.WorldConfig) -> Path:
    key = {"n_train": settings.n_train_scenes, "n_val": max(1, settings.n_train_scenes // 10),
           "n_test": settings.n_eval, "n_seq": settings.n_sequences, "n_test_seq": settings.n_test_sequences,
           "seed": seed, "filter": filter_name, "world": cfg.to_dict(), "version": 1}
    return paths.cache_dir() / "shapesworld" / cache.config_key(key)


def shapesworld(settings: Any, seed: int = 0, validity_filter: ValidityFilter | None = None,
                filter_name: str = "oracle", cfg: world.WorldConfig | None = None) -> dict[str, Any]:
    """Every ShapesWorld dataset for ``settings`` (a :class:`~nb_edit.core.config.RunSettings`), in
    the world ``settings.world`` names (or ``cfg``); ``["world_cfg"]`` is that world's config."""
    cfg = cfg or world.preset(settings.world)
    root = dataset_root(settings, seed, filter_name, cfg)
    names = ("unpaired", "paired", "noisy", "multiturn", "test")
    if not (root / DONE).exists():
        sizes = {"train": settings.n_train_scenes, "val": max(1, settings.n_train_scenes // 10)}
        _, curation = build_unpaired(root / "unpaired", cfg, sizes, seed, validity_filter=validity_filter,
                                     overwrite=True)
        build_paired(root / "paired", cfg, sizes, seed, overwrite=True)
        build_paired(root / "noisy", cfg, sizes, seed, noisy=True, overwrite=True)
        build_multiturn(root / "multiturn", cfg, {"train": settings.n_sequences, "test": settings.n_test_sequences},
                        seed, overwrite=True)
        build_test_set(root / "test", cfg, settings.n_eval, overwrite=True)
        (root / "curation.json").write_text(json.dumps(curation, indent=2, sort_keys=True))
        (root / DONE).write_text(json.dumps({"filter": filter_name}))
    out: dict[str, Any] = {name: read_dataset(root / name) for name in names}
    out["curation_metrics"] = json.loads((root / "curation.json").read_text())
    out["root"] = root
    out["world_cfg"] = cfg
    return out


def multiturn_test(settings: Any, n: int | None = None, cfg: world.WorldConfig | None = None):
    """The held-out multi-turn test sequences: the ``n_test_sequences`` of ``settings`` (the
    ``multiturn`` dataset's test split), or ``n`` of them when given. The test split is drawn
    from one fixed seed, so a longer split starts with the usual one; it is built on its own
    under ``data/cache/shapesworld/`` and leaves the training datasets, and the checkpoints keyed
    on them, as they are (a larger test set measures rare events, such as three turns in a row
    right, that ``n_test_sequences`` is too small to see)."""
    cfg = cfg or world.preset(settings.world)
    n = settings.n_test_sequences if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"multiturn_test: n={n!r} test sequences; pass a positive integer (or None for "
                         f"settings.n_test_sequences = {settings.n_test_sequences}).")
    root = paths.cache_dir() / "shapesworld" / cache.config_key(
        {"what": "multiturn_test", "n_test_seq": n, "world": cfg.to_dict(), "version": 1})
    if not (root / DONE).exists():
        build_multiturn(root / "multiturn", cfg, {"test": n}, overwrite=True)
        (root / DONE).write_text(json.dumps({"n_test_sequences": n}))
    return read_dataset(root / "multiturn").split("test")
