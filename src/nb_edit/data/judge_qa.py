"""Question-answer data for training the tiny VLM judge, labelled by the oracle.

Each example is (source image, output image, question, answer). Outputs are drawn the way
a judge meets them during training of an editor: correct edits, unchanged sources, wrong and
partial edits, collateral changes, artifacts, and generator-like blurs and blends of source
and target (hard negatives). Every label comes from the oracle's verdict on the actual
pixels (``world.judge`` / ``world.parse``), never from how the output was made, so a label
is right even where a corruption happened to be harmless.

Questions follow :mod:`nb_edit.models.vlm.questions` (the NP-Edit pair, the remove variant, presence,
quality) and, for the judge's feedback stage, every score question a method asks: Multi-Reward's
following and preserving scores (0-5) and MT-EditFlow's IF and CC (1-5, CC also against the
original of a multi-turn chain under the joined instructions), labelled with the oracle's
:func:`~nb_edit.world.graded_score`. A judge is only asked questions it was trained on.

Perception targets for the vision tower's first stage come from the same renders: per patch,
the colour, shape and texture of the object that covers it (or background), plus the image's
background colour and style.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nb_edit import world
from nb_edit.models.vlm import questions
from nb_edit.world.config import OBJECT_COLOURS
from nb_edit.world.render import object_layer

OUTPUT_KINDS = ("target", "source", "noisy", "blur", "blend", "other_target", "patchy")


@dataclass
class QAExample:
    source: np.ndarray  # uint8 (H, W, 3)
    output: np.ndarray  # uint8 (H, W, 3)
    question: str
    answer: str  # "yes" | "no" | "0".."5"
    kind: str  # followed | preserved | present | quality


def random_edit(scene: world.Scene, rng: np.random.Generator, cfg: world.WorldConfig) -> world.Edit:
    """A valid edit of a uniformly drawn type that is possible for ``scene``."""
    for _ in range(20):
        try:
            return world.sample_edit(scene, rng, cfg, str(rng.choice(cfg.edit_types)))
        except ValueError:  # impossible for this scene: draw another type
            continue
    return world.sample_edit(scene, rng, cfg)  # every type in turn


def candidate_output(edit: world.Edit, kind: str, rng: np.random.Generator, cfg: world.WorldConfig) -> np.ndarray:
    source, target = world.render(edit.source, cfg), world.render(edit.target, cfg)
    if kind == "target":
        return target
    if kind == "source":
        return source
    if kind == "noisy":
        return world.noisy_target(edit, rng, cfg).image
    if kind == "blur":
        return world.degrade(target, rng, noise_std=float(rng.uniform(0.0, 0.08)), blur_sigma=float(rng.uniform(0.3, 1.2)))
    if kind == "blend":
        alpha = float(rng.uniform(0.2, 0.8))
        return np.rint(alpha * target.astype(float) + (1 - alpha) * source.astype(float)).astype(np.uint8)
    if kind == "other_target":
        return world.render(random_edit(edit.source, rng, cfg).target, cfg)
    if kind == "patchy":
        return patch_artifacts(target, source, rng)
    raise ValueError(f"output kind {kind!r} is unknown; use one of {OUTPUT_KINDS}.")


def patch_artifacts(target: np.ndarray, source: np.ndarray, rng: np.random.Generator, patch: int = 4) -> np.ndarray:
    """A generator-like failure: some ``patch``-pixel tiles of the target replaced by tiles taken
    from elsewhere in the target or the source, each with a colour cast (what an undertrained
    patch-token DiT draws)."""
    out = target.copy()
    grid = target.shape[0] // patch
    for _ in range(int(rng.integers(3, grid * grid // 2))):
        (r, c), (r2, c2) = rng.integers(0, grid, size=2), rng.integers(0, grid, size=2)
        tile = (source if rng.random() < 0.5 else target)[r2 * patch:(r2 + 1) * patch, c2 * patch:(c2 + 1) * patch]
        cast = rng.normal(0.0, 25.0, size=3)
        out[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = np.clip(tile + cast, 0, 255).astype(np.uint8)
    return out


def removed_object_name(edit: world.Edit) -> str | None:
    if edit.edit_type != "remove" or edit.obj_index < 0:
        return None
    obj = edit.source.objects[edit.obj_index]
    return f"{obj.colour} {obj.shape}"


def _has(scene: world.Scene, name: str) -> bool:
    return any(f"{o.colour} {o.shape}" == name for o in scene.objects)


def edit_examples(edit: world.Edit, output: np.ndarray, cfg: world.WorldConfig,
                  verdict: world.Verdict | None = None) -> list[QAExample]:
    """The NP-Edit questions about one output, answered by the oracle."""
    source = world.render(edit.source, cfg)
    verdict = verdict or world.judge(source, edit, output, cfg)
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    examples = [QAExample(source, output, questions.preserved(edit.instruction), yes(verdict.preserved), "preserved"),
                QAExample(source, output, questions.followed(edit.instruction), yes(verdict.followed), "followed"),
                QAExample(source, output, questions.QUALITY, str(int(round(5 * verdict.quality))), "quality")]
    removed = removed_object_name(edit)
    if removed is not None:  # NP-Edit's remove variant: "does image 2 contain <object>?" -> no
        parsed = world.parse(output, cfg).scene
        examples.append(QAExample(source, output, questions.present(removed), yes(_has(parsed, removed)), "present"))
    return examples


SCORE_KINDS = ("following_score", "preserving_score", "if_score", "cc_score")
# the digits each score question answers with (Multi-Reward and quality 0-5, MT-EditFlow 1-5)
SCORE_RANGES = {"quality": (0, 5), "following_score": (0, 5), "preserving_score": (0, 5),
                "if_score": (1, 5), "cc_score": (1, 5), "cc_chain": (1, 5)}


def _digit(value) -> str:
    return str(int(np.rint(float(value))))


def score_examples(edit: world.Edit, output: np.ndarray, cfg: world.WorldConfig,
                   verdict: world.Verdict | None = None) -> list[QAExample]:
    """The score questions about one output (Multi-Reward 0-5, MT-EditFlow IF/CC 1-5), answered
    by the oracle's graded score rounded to a digit."""
    source = world.render(edit.source, cfg)
    verdict = verdict or world.judge(source, edit, output, cfg)
    i, f, p, q = edit.instruction, verdict.followed, verdict.preserved, verdict.quality
    asked = {"following_score": (questions.FOLLOWING_SCORE, f), "preserving_score": (questions.PRESERVING_SCORE, p),
             "if_score": (questions.IF_SCORE, f), "cc_score": (questions.CC_SCORE, p)}
    return [QAExample(source, output, template.format(instruction=i),
                      _digit(world.graded_score(flag, q, *SCORE_RANGES[kind])), kind)
            for kind, (template, flag) in asked.items()]


def chain_example(scene: world.Scene, rng: np.random.Generator, cfg: world.WorldConfig, kind: str) -> QAExample:
    """MT-EditFlow's multi-turn CC question: image 1 is the chain's original, image 2 a candidate
    for its last turn (earlier turns carried out), the instruction is every turn's joined.

    Labelled as the oracle's multi-turn CC (lowest per-turn CC): the earlier turns are correct,
    so it is the last turn's verdict on its own input.
    """
    chain = world.sample_chain(scene, rng, cfg, n_turns=int(rng.integers(2, 4)))
    last = chain[-1]
    output = candidate_output(last, kind, rng, cfg)
    verdict = world.judge(world.render(last.source, cfg), last, output, cfg)
    joined = questions.TURN_JOINER.join(e.instruction for e in chain)
    return QAExample(world.render(chain[0].source, cfg), output, questions.CC_SCORE.format(instruction=joined),
                     _digit(world.graded_score(verdict.preserved, verdict.quality, *SCORE_RANGES["cc_chain"])), "cc_chain")


def pick_example(edit: world.Edit, output: np.ndarray, cfg: world.WorldConfig, rng: np.random.Generator,
                 score_share: float) -> QAExample:
    """One question about one output: a score question with probability ``score_share``, else
    one of the NP-Edit questions."""
    verdict = world.judge(world.render(edit.source, cfg), edit, output, cfg)
    pool = score_examples if rng.random() < score_share else edit_examples
    examples = pool(edit, output, cfg, verdict)
    return examples[int(rng.integers(len(examples)))]


def changed_pixels(a: np.ndarray, b: np.ndarray, threshold: float = 20.0) -> np.ndarray:
    """Bool (H, W): pixels whose mean absolute RGB difference between two uint8 images exceeds ``threshold``."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=-1) > threshold


def patch_share(mask: np.ndarray, patch: int, min_share: float = 0.05) -> np.ndarray:
    """Per-patch labels of a bool mask ``(..., H, W)``: 1 where more than ``min_share`` of a patch is set."""
    *lead, h, w = mask.shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}x{w} mask does not split into {patch}-pixel patches; use a patch size dividing {h}.")
    share = mask.reshape(*lead, h // patch, patch, w // patch, patch).mean(axis=(-3, -1))
    return (share > min_share).reshape(*lead, -1)


def presence_example(scene: world.Scene, rng: np.random.Generator, cfg: world.WorldConfig) -> QAExample:
    """A single-image question (image 2 alone matters): is there a <colour> <shape>?"""
    image = world.render(scene, cfg)
    if rng.random() < 0.5 and scene.objects:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        name = f"{obj.colour} {obj.shape}"
    else:
        name = f"{rng.choice(cfg.colours)} {rng.choice(cfg.shapes)}"
    return QAExample(image, image, questions.present(name), "yes" if _has(scene, name) else "no", "present")


def qa_batch(cfg: world.WorldConfig, rng: np.random.Generator, batch_size: int,
             edit_share: float = 1.0, kind_weights: dict[str, float] | None = None,
             score_share: float = 0.0, chain_share: float = 0.0) -> list[QAExample]:
    """A batch mixing NP-Edit questions on edits (share ``edit_share``) and presence questions.

    With ``score_share`` > 0 that share of the edit questions are score questions
    (:func:`score_examples`), and ``chain_share`` of all examples are multi-turn CC questions
    (:func:`chain_example`). At 0 they draw nothing from ``rng``: the same seed gives the same
    batch as before they existed.
    """
    weights = kind_weights or {"target": 3, "source": 1.5, "noisy": 2, "blur": 1, "blend": 1, "other_target": 1,
                               "patchy": 1.5}
    kinds, probs = list(weights), np.array(list(weights.values()), dtype=float)
    draw_kind = lambda: str(rng.choice(kinds, p=probs / probs.sum()))  # noqa: E731
    out: list[QAExample] = []
    while len(out) < batch_size:
        scene = world.sample_scene(rng, cfg)
        if chain_share and rng.random() < chain_share:
            try:
                out.append(chain_example(scene, rng, cfg, draw_kind()))
            except ValueError:  # no chain or no wrong edit for this scene
                pass
            continue
        if rng.random() >= edit_share:
            out.append(presence_example(scene, rng, cfg))
            continue
        edit = random_edit(scene, rng, cfg)
        kind = draw_kind()
        try:
            output = candidate_output(edit, kind, rng, cfg)
        except ValueError:  # e.g. no wrong edit exists for this scene
            continue
        if score_share:
            out.append(pick_example(edit, output, cfg, rng, score_share))
            continue
        examples = edit_examples(edit, output, cfg)
        out.append(examples[int(rng.integers(len(examples)))])
    return out[:batch_size]


def perception_targets(scene: world.Scene, cfg: world.WorldConfig, patch: int) -> dict[str, np.ndarray]:
    """Per-patch labels (colour, shape, texture of the covering object; 0 = background) and
    image labels (background colour, style) for the vision tower's perception stage."""
    res, grid = cfg.resolution, cfg.resolution // patch
    best = np.zeros((grid, grid))
    labels = {k: np.zeros((grid, grid), dtype=np.int64) for k in ("colour", "shape", "texture")}
    colours = list(OBJECT_COLOURS)
    for obj in scene.objects:
        alpha, _ = object_layer(obj, scene.background, cfg)
        cover = alpha[: grid * patch, : grid * patch].reshape(grid, patch, grid, patch).mean(axis=(1, 3))
        take = (cover > 0.3) & (cover > best)
        best = np.where(take, cover, best)
        labels["colour"][take] = 1 + colours.index(obj.colour)
        labels["shape"][take] = 1 + cfg.shapes.index(obj.shape)
        labels["texture"][take] = 1 + cfg.textures.index(obj.texture)
    labels["background"] = np.array(cfg.backgrounds.index(scene.background))
    labels["style"] = np.array(cfg.styles.index(scene.style))
    assert res % patch == 0, f"resolution {res} is not a multiple of the patch size {patch}"
    return labels
