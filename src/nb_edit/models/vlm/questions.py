"""Every question the VLM judge is asked, in one place.

The same wording serves the tiny judge (trained on ShapesWorld with these exact templates, so
its word-level tokenizer is built from them) and a hub VLM in the full profile. Image slots
are marked by the judge itself; here ``image 1`` is always the source and ``image 2`` the
edited result.

* NP-Edit Sec. 3.1: edit verification (was the instruction carried out?, target "yes"; an
  unchanged image must be answered "no") and identity preservation (is everything the
  instruction does not touch unchanged?, target "yes"). For *remove* edits verification
  becomes "does image 2 contain <object>?" with target "no".
* Multi-Reward Sec. 3.1: three perspectives, each a 0-5 score (following, preserving, quality);
  the failure text is assembled from targeted yes/no questions (:data:`PRESENT`).
* MT-EditFlow Sec. 3.2: instruction following (IF) and content consistency (CC) on 1-5.
"""

from __future__ import annotations

FOLLOWED = "image 1 is the source . instruction : {instruction} . did image 2 carry out the instruction ? answer yes or no ."
PRESERVED = "image 1 is the source . instruction : {instruction} . apart from that , is image 2 the same as image 1 ? answer yes or no ."
PRESENT = "does image 2 contain a {object} ? answer yes or no ."
PRESERVED_REMOVE = "image 1 is the source . ignore the {object} . is the rest of image 2 the same as image 1 ? answer yes or no ."
QUALITY = "how clean is image 2 , from 0 to 5 ? answer with a number ."
FOLLOWING_SCORE = "image 1 is the source . instruction : {instruction} . how well did image 2 carry out the instruction , from 0 to 5 ? answer with a number ."
PRESERVING_SCORE = "image 1 is the source . instruction : {instruction} . how well did image 2 keep everything else , from 0 to 5 ? answer with a number ."
IF_SCORE = "image 1 is the source . instruction : {instruction} . rate how well image 2 follows the instruction from 1 to 5 . answer with a number ."
CC_SCORE = "image 1 is the source . instruction : {instruction} . rate how consistent image 2 is with image 1 outside the edit from 1 to 5 . answer with a number ."

# Alignment prompts of the tiny judge's pretraining (LLaVA's stage 1: dense next-token targets).
DESCRIBE = "describe image 2 ."
WHAT_CHANGED = "what changed from image 1 to image 2 ?"

ALL_TEMPLATES = (
    FOLLOWED, PRESERVED, PRESENT, PRESERVED_REMOVE, QUALITY,
    FOLLOWING_SCORE, PRESERVING_SCORE, IF_SCORE, CC_SCORE,
)
ANSWER_WORDS = ("yes", "no", "0", "1", "2", "3", "4", "5")


def followed(instruction: str) -> str:
    return FOLLOWED.format(instruction=instruction)


def preserved(instruction: str) -> str:
    return PRESERVED.format(instruction=instruction)


def present(obj: str) -> str:
    return PRESENT.format(object=obj)


def preserved_remove(obj: str) -> str:
    return PRESERVED_REMOVE.format(object=obj)


def template_words() -> list[str]:
    """Every word of the templates (placeholders removed), for a word-level tokenizer."""
    words: set[str] = set(ANSWER_WORDS)
    for template in ALL_TEMPLATES:
        for token in template.split():
            if not token.startswith("{"):
                words.add(token)
    return sorted(words)

# How a multi-turn question joins the instructions of the turns so far.
TURN_JOINER = " . "
