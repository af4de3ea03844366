import pytest

from rot_eval.answers import final_segment, is_correct, parse_number


@pytest.mark.parametrize("text, value", [
    ("72", 72.0), ("1,234", 1234.0), ("$5.50", 5.5), ("-3", -3.0), ("3/4", 0.75), ("-3/4", -0.75),
    ("12 apples", 12.0), ("The answer is 18.", 18.0), ("0.50", 0.5), ("costs $1,000,000 in total", 1_000_000.0),
    ("no number here", None), ("\u22127", -7.0), (".5 kg", 0.5),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("prediction, gold, correct", [
    ("72", "72", True), ("1,234", "1234", True), ("$10", "10", True), ("10 dollars", "10.0", True),
    ("1513", "1513.0", True), ("0.5", "1/2", True), ("-4", "4", False), ("Natalia sold 48/2 = 24 ... #### 72", "72", True),
    ("48/2 = 24 clips #### 24", "72", False), ("The answer is 18.", "18", True), ("5 5 6 0 8 2 0 1", "5 5 6 0 8 2 0 1", True),
    ("5 5 6 0 8 2 0 2", "5 5 6 0 8 2 0 1", False), ("", "3", False), ("7.0001", "7", True), ("7.01", "7", False),
])
def test_is_correct(prediction, gold, correct):
    assert is_correct(prediction, gold) is correct


def test_final_segment_takes_the_last_marker():
    assert final_segment("a #### b #### 12") == "12"
    assert final_segment("so the answer is 7") == "7"
