"""ShapesWorld: a synthetic editing world with a ground-truth oracle.

Scenes of 1-3 shapes on a background, rendered anti-aliased at a tiny resolution; edits of
eleven types with worded instructions, target scenes, captions and edited regions; multi-turn
chains; candidate proposals with known validity; noisy paired targets; and an oracle that
parses any image back into a scene and judges an edit's output (followed, preserved, quality).
"""

from .config import WORLDS, WorldConfig, preset
from .corrupt import CORRUPTIONS, NoisyTarget, degrade, noisy_target
from .edits import EDIT_TYPES, Edit, sample_edit, sample_edit_of_type
from .judge import Verdict, graded_score, judge
from .metrics import judge_agreement, parse_accuracy
from .oracle import Parsed, parse
from .phrasing import vocabulary, words
from .render import render
from .scene import Obj, Scene, caption, sample_scene
from .sequences import INVALID_KINDS, propose_candidates, sample_chain

__all__ = [
    "WorldConfig", "WORLDS", "preset", "Obj", "Scene", "EDIT_TYPES", "Edit", "Parsed", "Verdict", "NoisyTarget", "CORRUPTIONS",
    "INVALID_KINDS", "sample_scene", "render", "caption", "sample_edit", "sample_edit_of_type", "propose_candidates", "sample_chain",
    "parse", "judge", "graded_score", "noisy_target", "degrade", "vocabulary", "words", "parse_accuracy", "judge_agreement",
]
