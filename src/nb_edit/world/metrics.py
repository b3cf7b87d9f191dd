"""Measurements of the world itself: how well the oracle parses, and how its judge agrees
with the edits' ground truth. The numbers a notebook reports before anything trains."""

from __future__ import annotations

import numpy as np

from .config import WorldConfig
from .corrupt import degrade
from .edits import sample_edit, sample_edit_of_type
from .judge import judge, match
from .oracle import parse
from .render import render
from .scene import Scene, sample_scene


def scenes_match(truth: Scene, parsed: Scene, cfg: WorldConfig) -> bool:
    """Exact match of style, background (colour, texture) and objects (shape, colour, texture),
    with positions within ``cfg.pos_tol`` and sizes within ``cfg.size_tol``."""
    if (truth.style, truth.background, truth.bg_texture) != (parsed.style, parsed.background, parsed.bg_texture):
        return False
    if len(truth.objects) != len(parsed.objects):
        return False
    pairs = match(list(truth.objects), parsed.objects)
    if len(pairs) != len(truth.objects):
        return False
    for i, j in pairs.items():
        a, b = truth.objects[i], parsed.objects[j]
        if (a.shape, a.colour, a.texture) != (b.shape, b.colour, b.texture):
            return False
        if np.hypot(a.x - b.x, a.y - b.y) > cfg.pos_tol or abs(np.log(b.size / a.size)) > np.log1p(cfg.size_tol):
            return False
    return True


def parse_accuracy(cfg: WorldConfig, n: int = 500, seed: int = 0, degraded: bool = False,
                   noise_std: float = 0.03, blur_sigma: float = 0.5, edited: bool = False) -> float:
    """Share of ``n`` random scenes parsed exactly from their render (``edited``: from the
    targets of random edits instead, which include grayscale and negative pictures)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n):
        scene = sample_scene(rng, cfg)
        if edited:
            scene = sample_edit(scene, rng, cfg).target
        image = render(scene, cfg)
        if degraded:
            image = degrade(image, rng, noise_std=noise_std, blur_sigma=blur_sigma)
        hits += scenes_match(scene, parse(image, cfg).scene, cfg)
    return hits / n


def judge_agreement(cfg: WorldConfig, n_per_type: int = 50, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per edit type: share of target renders judged a success, and share of unchanged
    sources judged followed (should be 1 and 0; 1 for noop)."""
    rng = np.random.default_rng(seed)
    table = {}
    for kind in cfg.edit_types:
        target_ok = source_followed = done = 0
        while done < n_per_type:
            edit = sample_edit_of_type(rng, cfg, kind)
            source = render(edit.source, cfg)
            target_ok += judge(source, edit, render(edit.target, cfg), cfg).success
            source_followed += judge(source, edit, source, cfg).followed
            done += 1
        table[kind] = dict(target_success=target_ok / done, source_followed=source_followed / done)
    return table
