"""Parsers of judge answers: examples and properties (hypothesis)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nb_edit.models.vlm.parsing import parse_score, parse_turn_scores, parse_yes_no

FAST = settings(max_examples=150, deadline=None)
# scores as judges write them: integers and one or two decimals
scores = st.one_of(st.integers(0, 5).map(float), st.integers(0, 50).map(lambda n: n / 10),
                   st.integers(0, 500).map(lambda n: n / 100))
formats = st.sampled_from(["Score: {}", "score = {}", "{}/5", "{} out of 5", "<Score>{}</Score>",
                           "<Turn1Score>{}</Turn1Score>", "{}", "Rating: {}.", "The score is {}",
                           "I would give this edit {} points."])


@pytest.mark.parametrize("text, expected", [
    ("Score: 4", 4.0), ("4/5", 4.0), ("<Turn1Score>3</Turn1Score>", 3.0), ("3", 3.0),
    ("Final score: 4.5\n", 4.5), ("The edit is good. Rating: 2", 2.0),
    ("<Thought>turn 1 deserves score: 1, but</Thought> Score: 5", 5.0),
    ("Score: 7", None), ("Score: -1", None), ("8/10", None), ("no score given", None),
    ("There are 3 cats and 2 dogs", None), ("", None), ("Score: nan", None),
])
def test_parse_score_examples(text, expected):
    assert parse_score(text) == expected


def test_parse_score_respects_the_scale():
    assert parse_score("Score: 5", lo=1, hi=5) == 5.0
    assert parse_score("Score: 0", lo=1, hi=5) is None
    assert parse_score("7/10", lo=0, hi=10) == 7.0


@FAST
@given(st.text())
def test_parse_score_never_raises_and_stays_in_range(text):
    score = parse_score(text)
    assert score is None or 0.0 <= score <= 5.0


@FAST
@given(st.one_of(st.none(), st.integers(), st.binary(), st.lists(st.text())))
def test_parsers_accept_non_text(value):
    assert parse_score(value) is None and parse_yes_no(value) is None
    assert parse_turn_scores(value, 3) == [None, None, None]


@FAST
@given(scores, formats)
def test_formatted_scores_round_trip(score, fmt):
    assert parse_score(fmt.format(score)) == score


@FAST
@given(st.floats(min_value=5.01, max_value=1e6) | st.floats(max_value=-0.01, min_value=-1e6), formats)
def test_out_of_range_scores_are_none(score, fmt):
    assert parse_score(fmt.format(score)) is None


@FAST
@given(st.lists(st.one_of(st.none(), scores), min_size=1, max_size=5), st.text(alphabet="abc .\n", max_size=20))
def test_turn_scores_round_trip(turn_scores, filler):
    text = "<Thought> Turn 1: fine " + filler + " </Thought> " + " ".join(
        f"<Turn{k + 1}Score>{s}</Turn{k + 1}Score>" for k, s in enumerate(turn_scores) if s is not None)
    assert parse_turn_scores(text, len(turn_scores)) == turn_scores


@FAST
@given(st.text(), st.integers(0, 6))
def test_turn_scores_never_raise_and_have_one_entry_per_turn(text, n_turns):
    parsed = parse_turn_scores(text, n_turns)
    assert len(parsed) == n_turns and all(s is None or 0 <= s <= 5 for s in parsed)


def test_turn_scores_plain_form_and_range():
    assert parse_turn_scores("Turn 1 score: 4\nTurn 2: 9\nTurn 3 score - 2.5", 3) == [4.0, None, 2.5]
    assert parse_turn_scores("<Turn1Score>5</Turn1Score>", 2, lo=1, hi=5) == [5.0, None]


@FAST
@given(st.sampled_from(["yes", "no"]), st.sampled_from(["{}", "{}.", "{}, the edit was applied", "**{}**",
                                                       "Answer: {}", "'{}'", " {}!\n"]),
       st.sampled_from([str.lower, str.upper, str.title]))
def test_yes_no_round_trips(word, fmt, case):
    assert parse_yes_no(fmt.format(case(word))) is (word == "yes")


@pytest.mark.parametrize("text, expected", [
    ("Yes", True), ("no.", False), ("The instruction was followed: yes", True),
    ("<think>is it yes or no?</think> No", False), ("Yes or no? Answer: no", False),
    ("I am not sure", None), ("It could be yes or no", None), ("Nothing changed", None),
    ("Yesterday the image", None), ("", None),
])
def test_parse_yes_no_examples(text, expected):
    assert parse_yes_no(text) is expected


@FAST
@given(st.text())
def test_parse_yes_no_never_raises(text):
    assert parse_yes_no(text) in (True, False, None)
