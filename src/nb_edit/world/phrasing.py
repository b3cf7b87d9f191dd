"""How edits are worded: several templates per edit type, so a model must read the text.

Slots: ``ref`` (how an object is referred to, without "the"), ``thing`` (an object to add,
with its article), ``colour``, ``shape``, ``texture``, ``bg``, ``direction``. Every instruction
and caption is lower-case words separated by spaces, so ``vocabulary`` lists them all.
"""

from __future__ import annotations

import re

import numpy as np

from .config import WorldConfig
from .scene import article, plural

TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("add {thing}", "put {thing} in the picture", "place {thing} somewhere in the image", "insert {thing}"),
    "remove": ("remove the {ref}", "delete the {ref}", "take away the {ref}", "erase the {ref}"),
    "replace": ("turn the {ref} into a {shape}", "replace the {ref} with a {colour} {shape}",
                "change the {ref} into a {shape}", "make the {ref} a {shape}"),
    "colour": ("make the {ref} {colour}", "paint the {ref} {colour}", "change the colour of the {ref} to {colour}",
               "turn the {ref} {colour}"),
    "texture": ("make the {ref} {texture}", "give the {ref} a {texture} pattern",
                "change the pattern of the {ref} to {texture}", "turn the {ref} {texture}"),
    "resize:bigger": ("make the {ref} bigger", "enlarge the {ref}", "increase the size of the {ref}",
                      "scale up the {ref}"),
    "resize:smaller": ("make the {ref} smaller", "shrink the {ref}", "reduce the size of the {ref}",
                       "scale down the {ref}"),
    "move": ("move the {ref} {direction}", "shift the {ref} {direction}", "slide the {ref} {direction}",
             "push the {ref} {direction}"),
    "background": ("make the background {bg}", "change the background to {bg}", "paint the background {bg}",
                   "use {bg_article} {bg} background"),
    "style:grayscale": ("make the picture grayscale", "remove all colour from the image",
                        "convert the image to black and white", "turn the picture into grayscale"),
    "style:invert": ("invert the colours", "make a colour negative of the picture", "invert the image",
                     "turn the picture into a negative"),
    "count": ("add another {ref}", "duplicate the {ref}", "add a second {ref}", "make a copy of the {ref}"),
    "noop": ("do nothing", "leave the image as it is", "keep everything unchanged", "make no changes"),
}

# Unit vectors in image coordinates (y down) and their words.
DIRECTIONS: dict[str, tuple[tuple[float, float], str]] = {
    "left": ((-1.0, 0.0), "to the left"), "right": ((1.0, 0.0), "to the right"),
    "up": ((0.0, -1.0), "up"), "down": ((0.0, 1.0), "down"),
}

# Words that name an object loosely (ambiguous references are built from them).
GENERIC_NOUNS = ("shape", "object")


def thing(colour: str, shape: str, texture: str) -> str:
    """An object to add, with article: 'a striped blue square' (a solid texture is not said)."""
    words = ([] if texture == "solid" else [texture]) + [colour, shape]
    return f"{article(words[0])} {' '.join(words)}"


def phrase(key: str, rng: np.random.Generator, **slots) -> str:
    """One of the templates for ``key`` (an edit type, or 'resize:bigger', 'style:invert', ...)."""
    if key not in TEMPLATES:
        raise ValueError(f"phrase: no templates for {key!r}; known: {sorted(TEMPLATES)}.")
    template = TEMPLATES[key][int(rng.integers(len(TEMPLATES[key])))]
    if "bg" in slots:
        slots.setdefault("bg_article", article(slots["bg"]))
    return template.format(**slots)


def words(text: str) -> list[str]:
    """The words of an instruction or caption, as a word-level tokenizer should split them."""
    return re.findall(r"[a-z]+", text.lower())


def vocabulary(cfg: WorldConfig) -> list[str]:
    """Every word that this world's instructions and captions can contain, sorted."""
    values = dict(colour=cfg.colours, shape=cfg.shapes, texture=cfg.textures, bg=cfg.backgrounds,
                  direction=[d[1] for d in DIRECTIONS.values()])
    vocab: set[str] = set()
    for templates in TEMPLATES.values():
        for template in templates:
            vocab.update(words(re.sub(r"\{[a-z_]+\}", " ", template)))
    for group in values.values():
        for value in group:
            vocab.update(words(value))
    vocab.update(plural(s) for s in cfg.shapes)
    vocab.update(GENERIC_NOUNS)
    # captions: articles, counts, joiners, style prefixes
    vocab.update("a an and on background nothing two three four grayscale picture of colour negative".split())
    return sorted(vocab)
