import json

import pytest

from rot_data.records import RecordError, load_records


def test_gsm8k_ships_with_the_package_and_splits_the_solution():
    train, skipped = load_records("gsm8k", "train")
    test, _ = load_records("gsm8k", "test")
    assert (len(train), len(test), skipped) == (7473, 1319, [])
    first = train[0]
    assert first.id == "gsm8k-train-000001"
    assert first.answer == "72"
    assert "<<" not in first.cot and first.cot.startswith("Natalia sold 48/2 = 24 clips in May.")
    kept, _ = load_records("gsm8k", "train", keep_calculator=True)
    assert "<<48/2=24>>" in kept[0].cot


def test_ids_are_stable_and_unique():
    a, _ = load_records("gsm8k", "test")
    b, _ = load_records("gsm8k", "test")
    assert [r.id for r in a] == [r.id for r in b]
    assert len({r.id for r in a}) == len(a)


def test_icot_text_format(tmp_path):
    path = tmp_path / "mult.txt"
    path.write_text("5 6 * 7 4||5 5 + 0 6 #### 5 5 6\n\n1 2 * 3 4||3 6 #### 3 6 1\n")
    records, _ = load_records(str(path))
    assert [(r.question, r.cot, r.answer) for r in records] == [("5 6 * 7 4", "5 5 + 0 6", "5 5 6"), ("1 2 * 3 4", "3 6", "3 6 1")]
    assert records[1].id == "mult-000003"  # line numbers, blank lines included


@pytest.mark.parametrize("name, rows", [("gsm_hard", 1319), ("svamp", 1000), ("multiarith", 600), ("icot_gsm8k", 6973)])
def test_shared_sets_load_with_the_right_counts(shared_data, name, rows):
    split = "train" if name == "icot_gsm8k" else "test"
    records, skipped = load_records(name, split, data_dir=shared_data, require_cot=name == "icot_gsm8k")
    assert len(records) == rows and not skipped
    assert all(r.question and r.answer for r in records)


def test_numeric_targets_lose_a_spurious_decimal(shared_data):
    records, _ = load_records("multiarith", "test", data_dir=shared_data, require_cot=False)
    assert records[0].answer == "39"


BAD_ROWS = [
    ('{"question": "q", "cot": "c", "answer": "1"}', None),
    ("{not json", "bad JSON"),
    ('{"question": "q", "answer": "1", "cot": ""}', "empty CoT"),
    ('{"question": "q", "cot": "c"}', "missing field 'answer'"),
    ('{"question": 3, "cot": "c", "answer": "1"}', "field 'question' is int, not a string"),
]


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_ROWS) + "\n")
    return path


def test_malformed_row_stops_the_job_naming_file_and_line(bad_file):
    with pytest.raises(RecordError) as error:
        load_records(str(bad_file))
    assert str(error.value) == f"{bad_file}:2: bad JSON (Expecting property name enclosed in double quotes); fix the row or pass --on-error skip"


def test_malformed_rows_are_skipped_and_counted(bad_file):
    records, skipped = load_records(str(bad_file), on_error="skip")
    assert [r.id for r in records] == ["rows-000001"]
    expected = [(i + 1, reason) for i, (_, reason) in enumerate(BAD_ROWS) if reason]
    assert [(s.line, s.reason[:len(reason)]) for s, (_, reason) in zip(skipped, expected)] == expected
    assert all(s.file == str(bad_file) for s in skipped)


def test_unknown_dataset_and_missing_data_dir_say_what_to_do():
    with pytest.raises(RecordError, match="neither a built-in name"):
        load_records("nope")
    with pytest.raises(RecordError, match="pass --data-dir"):
        load_records("svamp", "test")
    with pytest.raises(RecordError, match="has splits"):
        load_records("gsm8k", "valid")


@pytest.mark.parametrize("name, expected", [("gsm8k", 1319), ("gsm_hard", 1319), ("svamp", 1000), ("multiarith", 600)])
def test_the_four_benchmarks_load_for_evaluation_with_their_file_sizes(shared_data, name, expected):
    records, skipped = load_records(name, "test", data_dir=shared_data, require_cot=False)
    assert len(records) == expected and not skipped
