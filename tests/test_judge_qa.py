"""The judge's training questions: oracle labels, the graded scores, and coverage of every
question the methods ask."""

from __future__ import annotations

import numpy as np
import pytest

from nb_edit import world
from nb_edit.data import judge_qa
from nb_edit.models.vlm import questions


@pytest.fixture(scope="module")
def cfg():
    return world.WorldConfig()


def test_graded_score_splits_the_scale_by_the_verdict():
    assert world.graded_score(True, 1.0, 1, 5) == pytest.approx(5.0)
    assert world.graded_score(False, 0.0, 1, 5) == pytest.approx(1.0)
    # MT-EditFlow's 1-5 form: 1 + 3 * flag + quality
    flags, quality = np.array([0, 1, 1, 0]), np.array([0.2, 0.9, 0.0, 1.0])
    np.testing.assert_allclose(world.graded_score(flags, quality, 1, 5), 1 + 3 * flags + quality, rtol=1e-6)
    # any success ranks above any failure on 0-5
    assert float(world.graded_score(True, 0.0, 0, 5)) > float(world.graded_score(False, 1.0, 0, 5))


def test_score_labels_follow_the_oracle(cfg):
    rng = np.random.default_rng(3)
    seen = 0
    for _ in range(40):
        edit = judge_qa.random_edit(world.sample_scene(rng, cfg), rng, cfg)
        if edit.edit_type == "noop":
            continue
        for kind in ("target", "source"):
            output = judge_qa.candidate_output(edit, kind, rng, cfg)
            verdict = world.judge(world.render(edit.source, cfg), edit, output, cfg)
            by_kind = {e.kind: int(e.answer) for e in judge_qa.score_examples(edit, output, cfg, verdict)}
            assert set(by_kind) == set(judge_qa.SCORE_KINDS)
            assert (by_kind["following_score"] >= 4) == verdict.followed or verdict.quality < 0.5
            assert (by_kind["if_score"] >= 4) == verdict.followed or verdict.quality < 0.5
            assert 0 <= by_kind["preserving_score"] <= 5 and 1 <= by_kind["cc_score"] <= 5
            seen += 1
    assert seen >= 40


def test_zero_score_shares_leave_the_batch_unchanged(cfg):
    """Stage 3's pool must stay what it was: the new shares at 0 draw nothing from the stream."""
    a = judge_qa.qa_batch(cfg, np.random.default_rng(5), 12, edit_share=0.85)
    b = judge_qa.qa_batch(cfg, np.random.default_rng(5), 12, edit_share=0.85, score_share=0.0, chain_share=0.0)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert all(np.array_equal(x.output, y.output) for x, y in zip(a, b))


def test_feedback_questions_cover_every_score_question_the_methods_ask(cfg):
    from nb_edit.models.vlm.questions import TURN_JOINER

    batch = judge_qa.qa_batch(cfg, np.random.default_rng(0), 300, edit_share=0.85, score_share=0.5, chain_share=0.1)
    asked = {questions.FOLLOWING_SCORE, questions.PRESERVING_SCORE, questions.IF_SCORE, questions.CC_SCORE,
             questions.QUALITY, questions.FOLLOWED, questions.PRESERVED}
    prefixes = {t.split("{instruction}")[-1] for t in asked}
    covered = {p for p in prefixes for e in batch if e.question.endswith(p)}
    assert covered == prefixes
    chains = [e for e in batch if e.kind == "cc_chain"]
    # two or three turns' instructions joined: more joiners than a single-turn CC question holds
    assert chains and all(e.question.count(TURN_JOINER) > questions.CC_SCORE.count(TURN_JOINER) for e in chains)
    assert all(1 <= int(e.answer) <= 5 for e in chains)
