"""ShapesWorld: scenes, rendering, captions, edits, chains, candidates, noisy targets, oracle."""

import json
import re

import numpy as np
import pytest

from nb_edit.world import (
    CORRUPTIONS,
    EDIT_TYPES,
    INVALID_KINDS,
    Edit,
    Obj,
    Scene,
    WorldConfig,
    caption,
    degrade,
    judge,
    noisy_target,
    parse,
    parse_accuracy,
    propose_candidates,
    render,
    sample_chain,
    sample_edit,
    sample_edit_of_type,
    sample_scene,
    vocabulary,
    words,
)
from nb_edit.world.config import BG_TEXTURES, OBJECT_COLOURS, SHAPES, TEXTURES
from nb_edit.world.phrasing import TEMPLATES

CFG = WorldConfig()


def edits_of(kind, n, seed, cfg=CFG):
    rng = np.random.default_rng(seed)
    return [sample_edit_of_type(rng, cfg, kind) for _ in range(n)]


def with_collateral(edit, cfg=CFG):
    """The target with one untouched object recoloured (or retextured when no colour is free),
    or, when every object is touched, the background changed."""
    target = edit.target
    touched = {edit.obj_index} if edit.obj_index >= 0 and edit.edit_type != "remove" else set()
    if edit.edit_type in ("add", "count"):
        touched.add(len(target.objects) - 1)
    untouched = [j for j in range(len(target.objects)) if j not in touched]
    if not untouched:
        new_bg = next(b for b in cfg.backgrounds if b != target.background)
        return target.with_(background=new_bg)
    j = untouched[0]
    obj = target.objects[j]
    free = [c for c in cfg.colours if c != obj.colour and not target.matching(c, obj.shape)
            and not edit.source.matching(c, obj.shape)]
    texture = next(t for t in cfg.textures if t != obj.texture)
    objects = list(target.objects)
    objects[j] = obj.with_(colour=free[0]) if free else obj.with_(texture=texture)
    return target.with_(objects=objects)


def test_config_round_trip_and_bad_values():
    cfg = WorldConfig(resolution=48, colours=("red", "blue"))
    assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="resolution"):
        WorldConfig(resolution=8)
    with pytest.raises(ValueError, match="colours"):
        WorldConfig(colours=("red", "mauve"))
    with pytest.raises(ValueError, match="unknown keys"):
        WorldConfig.from_dict({"resoluton": 32})


def test_same_seed_same_scene_and_pixels():
    a = sample_scene(np.random.default_rng(7), CFG)
    b = sample_scene(np.random.default_rng(7), CFG)
    assert a == b
    assert np.array_equal(render(a, CFG), render(b, CFG))
    edit_a = sample_edit(a, np.random.default_rng(3), CFG)
    edit_b = sample_edit(b, np.random.default_rng(3), CFG)
    assert edit_a.instruction == edit_b.instruction and edit_a.target == edit_b.target
    others = {sample_scene(np.random.default_rng(s), CFG) for s in range(20)}
    assert len(others) == 20


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_render_is_uint8_antialiased_and_within_bounds(resolution):
    cfg = WorldConfig(resolution=resolution)
    scene = Scene("white", (Obj("circle", "red", 0.3, 0.5, 0.5),))
    image = render(scene, cfg)
    assert image.dtype == np.uint8 and image.shape == (resolution, resolution, 3)
    red = image[..., 0].astype(int) - image[..., 1]
    assert (red > 150).sum() > 0 and (image[0] == 240).all()  # a red blob, a clean border
    assert ((red > 10) & (red < 150)).sum() > 0  # anti-aliased edge pixels mix the colours


def test_scenes_hold_unambiguous_nonoverlapping_objects():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng, CFG)
        assert CFG.min_objects <= len(scene.objects) <= CFG.max_objects
        for i, a in enumerate(scene.objects):
            assert CFG.size_range[0] <= a.size <= CFG.size_range[1]
            for b in scene.objects[i + 1:]:
                assert np.hypot(a.x - b.x, a.y - b.y) >= a.radius + b.radius
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_captions_name_colours_shapes_background_but_not_positions_sizes_textures():
    scene = Scene("gray", (Obj("circle", "red", 0.25, 0.2, 0.3, "striped"), Obj("square", "blue", 0.3, 0.7, 0.7)))
    text = caption(scene)
    assert "red circle" in text and "blue square" in text and "gray background" in text
    moved = scene.with_(objects=[o.with_(x=1 - o.x, size=o.size * 1.2, texture="solid") for o in scene.objects])
    assert caption(moved) == text
    banned = {"left", "right", "top", "bottom", "up", "down", "small", "big", "bigger", "large", "striped",
              "solid", "checked", "centre", "center", "corner"}
    rng = np.random.default_rng(1)
    for _ in range(100):
        assert not banned & set(words(caption(sample_scene(rng, CFG))))
    twins = Scene("white", (Obj("circle", "red", 0.25, 0.2, 0.3), Obj("circle", "red", 0.25, 0.7, 0.7)))
    assert caption(twins) == "two red circles on a white background"


def test_parse_accuracy_on_clean_and_degraded_renders():
    assert parse_accuracy(CFG, n=60, seed=11) >= 0.98
    assert parse_accuracy(CFG, n=30, seed=12, edited=True) >= 0.95  # includes grayscale / negatives
    assert parse_accuracy(CFG, n=30, seed=13, degraded=True) >= 0.9


def test_parse_grows_with_the_world():
    big = WorldConfig(shapes=SHAPES, colours=tuple(OBJECT_COLOURS), textures=TEXTURES, bg_textures=BG_TEXTURES,
                      backgrounds=("white", "gray", "navy", "olive"), max_objects=4)
    assert parse_accuracy(big, n=25, seed=0) >= 0.9


def test_parse_rejects_bad_images_and_rates_noise_lower():
    with pytest.raises(ValueError, match="uint8"):
        parse(np.zeros((32, 32, 3), np.float32), CFG)
    with pytest.raises(ValueError, match="resolution"):
        parse(np.zeros((16, 16, 3), np.uint8), CFG)
    image = render(sample_scene(np.random.default_rng(2), CFG), CFG)
    clean, noisy = parse(image, CFG), parse(degrade(image, np.random.default_rng(0), 0.08, 0.0), CFG)
    assert clean.quality > 0.95 and noisy.quality < 0.5 * clean.quality
    assert 0 <= noisy.confidence < clean.confidence <= 1


@pytest.mark.parametrize("kind", EDIT_TYPES)
def test_every_edit_type_is_judged_right(kind):
    for edit in edits_of(kind, 3, seed=EDIT_TYPES.index(kind)):
        assert edit.edit_type == kind and edit.valid
        assert edit.caption == caption(edit.source) and edit.caption_edited == caption(edit.target)
        assert edit.region.dtype == bool and edit.region.shape == (CFG.resolution,) * 2
        assert edit.region.any() == (kind != "noop")
        if edit.obj_index >= 0:
            ref = edit.source.objects[edit.obj_index]
            assert ref.name in edit.instruction and len(edit.source.matching(ref.colour, ref.shape)) == 1
        source = render(edit.source, CFG)
        on_target = judge(source, edit, render(edit.target, CFG), CFG)
        assert on_target.followed and on_target.preserved and on_target.success, on_target.details
        assert on_target.quality > 0.9
        unchanged = judge(source, edit, source, CFG)
        assert unchanged.followed == (kind == "noop"), unchanged.details
        collateral = judge(source, edit, render(with_collateral(edit), CFG), CFG)
        assert not collateral.preserved and not collateral.success, collateral.details
        if kind != "noop":
            assert collateral.followed


@pytest.mark.parametrize("kind", EDIT_TYPES)
def test_every_edit_type_has_several_phrasings(kind):
    keys = [k for k in TEMPLATES if k.split(":")[0] == kind]
    assert keys and all(len(set(TEMPLATES[k])) >= 3 for k in keys)
    instructions = {e.instruction for e in edits_of(kind, 40, seed=99)}
    stems = {re.sub(r"\b(" + "|".join(OBJECT_COLOURS) + r")\b", "", i) for i in instructions}
    assert len(stems) >= 3


def test_edit_round_trips_through_json():
    for edit in edits_of(None, 10, seed=5):
        back = Edit.from_dict(json.loads(json.dumps(edit.to_dict())))
        assert back.target == edit.target and back.instruction == edit.instruction
        assert np.array_equal(back.region, edit.region)


def test_impossible_edit_raises_naming_the_type():
    lone = Scene("white", (Obj("circle", "red", 0.3, 0.5, 0.5),))
    with pytest.raises(ValueError, match="remove"):
        sample_edit(lone, np.random.default_rng(0), CFG, "remove")
    with pytest.raises(ValueError, match="shrink"):
        sample_edit(lone, np.random.default_rng(0), CFG, "shrink")
    styled = lone.with_(style="invert")
    with pytest.raises(ValueError, match="colour"):
        sample_edit(styled, np.random.default_rng(0), CFG, "colour")


def test_chains_are_three_compatible_turns():
    rng = np.random.default_rng(4)
    for _ in range(6):
        chain = sample_chain(sample_scene(rng, CFG), rng, CFG, n_turns=3)
        assert len(chain) == 3
        kinds = [e.edit_type for e in chain]
        assert len(set(kinds)) == 3 and "noop" not in kinds and "style" not in kinds[:-1]
        for before, after in zip(chain, chain[1:]):
            assert after.source == before.target
        for edit in chain:
            verdict = judge(render(edit.source, CFG), edit, render(edit.target, CFG), CFG)
            assert verdict.success, (edit.instruction, verdict.details)


def test_candidates_mix_valid_and_known_invalid_kinds():
    scene = Scene("gray", (Obj("circle", "red", 0.25, 0.25, 0.3), Obj("circle", "blue", 0.25, 0.75, 0.3),
                           Obj("square", "yellow", 0.25, 0.5, 0.75, "striped")))
    candidates = propose_candidates(scene, np.random.default_rng(0), CFG, n=80)
    assert len(candidates) == 80
    prefixes = {"absent object": "absent", "no change": "no_change", "ambiguous reference": "ambiguous"}
    seen = set()
    for c in candidates:
        if c.valid:
            assert c.reason == "" and (c.target != c.source or c.edit_type == "noop")
            continue
        assert c.target == c.source and not c.region.any()
        kind = next(v for k, v in prefixes.items() if c.reason.startswith(k))
        seen.add(kind)
        if kind == "absent":
            colour, shape = re.search(r"no (\w+) (\w+) in", c.reason).groups()
            assert not scene.matching(colour, shape) and f"{colour} {shape}" in c.instruction
        if kind == "ambiguous":
            assert int(re.search(r": (\d) objects", c.reason).group(1)) >= 2
    assert seen == set(INVALID_KINDS)
    assert 0.3 < np.mean([c.valid for c in candidates]) < 0.7


@pytest.mark.parametrize("kind", ["colour", "move", "remove", "background", "add"])
def test_noisy_targets_record_the_oracles_truth(kind):
    rng = np.random.default_rng(8)
    for edit in edits_of(kind, 2, seed=21):
        source = render(edit.source, CFG)
        qualities = {}
        for corruption in CORRUPTIONS:
            noisy = noisy_target(edit, rng, CFG, corruption)
            assert noisy.corruption == corruption and noisy.image.dtype == np.uint8
            verdict = judge(source, edit, noisy.image, CFG)
            assert (noisy.followed, noisy.preserved) == (verdict.followed, verdict.preserved)
            assert noisy.quality == pytest.approx(verdict.quality)
            qualities[corruption] = noisy.quality
            if corruption == "clean":
                assert noisy.followed and noisy.preserved
            if corruption == "wrong_edit":
                assert not (noisy.followed and noisy.preserved)
            if corruption == "collateral":
                assert noisy.followed and not noisy.preserved
            if corruption == "partial" and kind == "move":
                assert not noisy.followed
        assert qualities["artifacts"] < 0.6 * qualities["clean"]


def test_degrade_is_controlled():
    image = render(sample_scene(np.random.default_rng(0), CFG), CFG)
    assert np.array_equal(degrade(image, np.random.default_rng(0), 0.0, 0.0), image)
    noisy = degrade(image, np.random.default_rng(0), 0.05, 0.5)
    assert noisy.dtype == np.uint8 and noisy.shape == image.shape
    assert 3 < np.abs(noisy.astype(int) - image).mean() < 30
    with pytest.raises(ValueError, match="uint8"):
        degrade(image.astype(float), np.random.default_rng(0))


def test_vocabulary_covers_every_instruction_and_caption():
    vocab = set(vocabulary(CFG))
    assert {"red", "circle", "circles", "background", "striped", "left", "grayscale"} <= vocab
    assert "purple" not in vocab and "star" not in vocab  # only this config's words
    rng = np.random.default_rng(6)
    for _ in range(150):
        scene = sample_scene(rng, CFG)
        for edit in [sample_edit(scene, rng, CFG)] + propose_candidates(scene, rng, CFG, 3):
            for text in (edit.instruction, edit.caption, edit.caption_edited):
                assert set(words(text)) <= vocab, text


def test_caption_of_a_crowded_parse_does_not_fail():
    # a generated image may parse into more identical objects than any scene has
    from nb_edit.world import Obj, Scene, caption

    scene = Scene("white", tuple(Obj("circle", "red", 0.1, 0.1 * i + 0.05, 0.5) for i in range(7)))
    assert caption(scene) == "7 red circles on a white background"


def test_noisy_target_without_verdict_is_the_same_image_and_stream():
    from nb_edit.data.judge_qa import random_edit

    cfg = WorldConfig()
    for seed in range(8):
        edit = random_edit(sample_scene(np.random.default_rng(seed), cfg), np.random.default_rng(50 + seed), cfg)
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        judged, fast = noisy_target(edit, r1, cfg), noisy_target(edit, r2, cfg, with_verdict=False)
        assert np.array_equal(judged.image, fast.image) and judged.corruption == fast.corruption
        assert fast.followed is None and isinstance(judged.followed, bool)
        assert r1.random() == r2.random()  # the verdict drew no random numbers


def test_sample_edit_of_type_names_a_type_the_world_forbids():
    rng = np.random.default_rng(0)
    assert sample_edit_of_type(rng, CFG, "remove").edit_type == "remove"
    with pytest.raises(ValueError, match="unknown"):
        sample_edit_of_type(rng, CFG, "rotate")
    one_object = WorldConfig(min_objects=1, max_objects=1)
    with pytest.raises(ValueError, match="no 'count' edit"):
        sample_edit_of_type(rng, one_object, "count", max_scenes=20)


def test_the_ladder_of_worlds_and_their_edit_types():
    from nb_edit.world import WORLDS, preset

    assert preset("rich") == WorldConfig()
    small = preset("small")
    # the small world: up to 2 objects, plain colours, at least six edits beside "do nothing",
    # among them add, remove, colour, replace and a global one
    assert small.max_objects == 2 and small.textures == ("solid",) and small.styles == ("normal",)
    assert {"add", "remove", "colour", "replace", "background"} <= set(small.edit_types)
    assert len(set(small.edit_types) - {"noop"}) >= 6
    for name in WORLDS:
        cfg = preset(name)
        assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        rng = np.random.default_rng(0)
        drawn = {sample_edit(sample_scene(rng, cfg), rng, cfg).edit_type for _ in range(300)}
        assert drawn == set(cfg.edit_types), name  # every chosen type is drawn, no other
        chain = sample_chain(sample_scene(rng, cfg), rng, cfg, n_turns=2) if name != "toy" else []
        assert all(e.edit_type in cfg.edit_types for e in chain)
    with pytest.raises(ValueError, match="not among this world's edit_types"):
        sample_edit_of_type(np.random.default_rng(0), small, "texture")
    with pytest.raises(ValueError, match="unknown; choose one of"):
        preset("huge")
    with pytest.raises(ValueError, match="edit_types"):
        WorldConfig(edit_types=("add", "rotate"))
    assert preset("small", max_objects=1).max_objects == 1
