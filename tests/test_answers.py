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
    ("5 5 6 0 8 2 0 2", "5 5 6 0 8 2 0 1", False), ("", "3", False), ("7.0001", "7", False), ("7.01", "7", False),
])
def test_is_correct(prediction, gold, correct):
    assert is_correct(prediction, gold) is correct


def test_final_segment_takes_the_last_marker():
    assert final_segment("a #### b #### 12") == "12"
    assert final_segment("so the answer is 7") == "7"


@pytest.mark.parametrize("prediction, gold, correct", [
    ("#### 12344700", "12345678", False),  # off by 978: was counted right with a 1e-4 tolerance
    ("#### 12345679", "12345678", False),
    ("#### 12345678", "12345678.0", True),
    ("#### 12,345,678", "12345678", True),
    ("#### 3.3333333333333335", "3.3333333333333335", True),
    ("#### 3.333333333333333", "3.3333333333333335", True),  # float formatting only
    ("#### 3.333", "3.3333333333333335", False),
    ("#### 987654321987", "987654321986", False),
    ("#### -5400000", "-5400000.0", True),
    ("#### 3244047.1", "3244047.0999999996", True),
    ("#### 9284017268535", "9284017268534.4", False),
])
def test_large_answers_are_compared_exactly(prediction, gold, correct):
    assert is_correct(prediction, gold) is correct


def test_gsm_hard_golds_match_themselves_and_not_their_neighbours():
    from rot_data.records import load_records

    records, _ = load_records("gsm_hard", "test", require_cot=False)
    for record in records:
        gold = record.answer
        assert is_correct(f"#### {gold}", gold), gold
        value = parse_number(gold)
        if abs(value) >= 1000:
            assert not is_correct(f"#### {round(value) + 1}", gold) and not is_correct(f"#### {round(value) - 1}", gold), gold
