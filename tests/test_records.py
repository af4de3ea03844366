
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
    assert records[1].id.startswith("mult-") and records[1].id.endswith("-000003")  # line numbers, blank lines included


@pytest.mark.parametrize("name, rows", [("gsm_hard", 1319), ("svamp", 1000), ("multiarith", 600), ("icot_gsm8k", 1319)])
def test_shared_sets_load_with_the_right_counts(shared_data, name, rows):
    records, skipped = load_records(name, "test", require_cot=False)  # shipped: no --data-dir
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
    assert [r.id.rsplit("-", 1)[1] for r in records] == ["000001"]
    expected = [(i + 1, reason) for i, (_, reason) in enumerate(BAD_ROWS) if reason]
    assert [(s.line, s.reason[:len(reason)]) for s, (_, reason) in zip(skipped, expected)] == expected
    assert all(s.file == str(bad_file) for s in skipped)


def test_unknown_dataset_and_missing_data_dir_say_what_to_do():
    with pytest.raises(RecordError, match="neither a built-in name"):
        load_records("nope")
    with pytest.raises(RecordError, match="not shipped with the package; pass --data-dir"):
        load_records("icot_gsm8k", "train")
    assert load_records("svamp", "test", require_cot=False)[0]  # shipped: no --data-dir
    with pytest.raises(RecordError, match="has splits"):
        load_records("gsm8k", "valid")


@pytest.mark.parametrize("name, expected", [("gsm8k", 1319), ("gsm_hard", 1319), ("svamp", 1000), ("multiarith", 600)])
def test_the_four_benchmarks_load_for_evaluation_with_their_file_sizes(shared_data, name, expected):
    records, skipped = load_records(name, "test", data_dir=shared_data, require_cot=False)
    assert len(records) == expected and not skipped


GOOD = b'{"question": "q", "cot": "1 + 1 = 2", "answer": "2"}'


def test_a_row_with_two_answer_markers_is_a_bad_row(tmp_path):
    """The true answer must not be drawn into the CoT image while a second '####' becomes the answer."""
    text = tmp_path / "rows.txt"
    text.write_text("1 2 * 3 4||3 6 #### 3 6 1\nq||cot #### 2 2 1 1 7 7 7 1 #### 99\n")
    with pytest.raises(RecordError, match=r"rows.txt:2: line has 2 '####' markers"):
        load_records(str(text))
    solution = tmp_path / "rows.jsonl"
    solution.write_text('{"question": "q", "answer": "1 + 1 = 2 #### 2 #### 5"}\n')
    with pytest.raises(RecordError, match=r"rows.jsonl:1: solution has 2 '####' markers"):
        load_records(str(solution))


def test_invalid_utf8_is_one_bad_row_with_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(GOOD + b"\n" + b'{"question": "q\xff", "cot": "c", "answer": "1"}\n' + GOOD + b"\n")
    with pytest.raises(RecordError) as error:
        load_records(str(path))
    assert str(error.value) == f"{path}:2: invalid UTF-8 (byte 0xff at column 16); fix the row or pass --on-error skip"
    records, skipped = load_records(str(path), on_error="skip")
    assert [r.line for r in records] == [1, 3] and [(s.line, s.reason) for s in skipped] == [(2, "invalid UTF-8 (byte 0xff at column 16)")]


def test_bom_and_windows_line_ends_are_accepted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n" + GOOD + b"\r\n")
    records, skipped = load_records(str(path))
    assert len(records) == 2 and not skipped and records[0].answer == "2"
    text = tmp_path / "mult.txt"
    text.write_bytes(b"\xef\xbb\xbf5 6 * 7 4||5 5 + 0 6 #### 5 5 6\r\n")
    assert load_records(str(text))[0][0].answer == "5 5 6"


def test_control_characters_are_bad_rows_but_tabs_and_newlines_are_text(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q", "cot": "a\\u0000b", "answer": "1"}\n'
                    '{"question": "q", "cot": "a\\tb\\nc", "answer": "1"}\n'
                    '{"question": "q\\u001b[31m", "cot": "c", "answer": "1"}\n'
                    '{"question": "q", "cot": "\\ud800", "answer": "1"}\n')
    records, skipped = load_records(str(path), on_error="skip")
    assert [r.cot for r in records] == ["a\tb\nc"]
    assert [(s.line, s.reason) for s in skipped] == [(1, "control character U+0000 in field 'cot'"),
                                                     (3, "control character U+001B in field 'question'"),
                                                     (4, "unpaired surrogate U+D800 in field 'cot'")]


def test_a_rows_own_id_is_kept_and_a_repeated_one_is_a_bad_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "train-7", "question": "q", "cot": "c", "answer": 1}\n'
                    '{"question": "q", "cot": "c", "answer": "1"}\n'
                    '{"id": 12, "question": "q", "cot": "c", "answer": "1"}\n'
                    '{"id": "train-7", "question": "q2", "cot": "c", "answer": "1"}\n')
    with pytest.raises(RecordError, match=r"rows.jsonl:4: duplicate id 'train-7' \(first at line 1\); fix the row"):
        load_records(str(path))
    records, skipped = load_records(str(path), on_error="skip")
    assert [r.id for r in records][::2] == ["train-7", "12"] and records[0].answer == "1"  # integer answers too
    assert [(s.line, s.reason) for s in skipped] == [(4, "duplicate id 'train-7' (first at line 1)")]


def test_files_with_the_same_name_in_two_folders_get_different_ids(tmp_path):
    ids = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.jsonl").write_bytes(GOOD + b"\n")
        ids.append(load_records(str(tmp_path / folder / "train.jsonl"))[0][0].id)
    assert ids[0] != ids[1] and all(i.startswith("train-") and i.endswith("-000001") for i in ids)
    assert load_records(str(tmp_path / "a" / "train.jsonl"))[0][0].id == ids[0]  # and stable


@pytest.mark.parametrize("content, message", [
    (b'[{"question": "q", "cot": "c", "answer": "1"},\n {"question": ', ":2: bad JSON (Expecting value); fix the file"),
    (b'[{"question": "q", "cot": "c", "answer": "1"},\n{"question": "\xfe"}]', ":2: invalid UTF-8 (byte 0xfe); re-save the file as UTF-8"),
])
def test_a_broken_json_document_stops_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "rows.json"
    path.write_bytes(content)
    with pytest.raises(RecordError) as error:
        load_records(str(path), on_error="skip")
    assert str(error.value) == f"{path}{message}"


def test_cr_lf_and_crlf_each_end_a_row(tmp_path):
    """Ten rows with lone CR, LF and CR LF endings mixed are ten rows: none joined to its neighbour, none lost."""
    endings = [b"\r", b"\n", b"\r\n"]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(GOOD.replace(b'"q"', f'"q{i}"'.encode()) + endings[i % 3] for i in range(10)))
    records, skipped = load_records(str(path), on_error="skip")
    assert [r.question for r in records] == [f"q{i}" for i in range(10)] and not skipped
    assert [r.line for r in records] == list(range(1, 11))
    text = tmp_path / "rows.txt"
    text.write_bytes(b"1 2 * 3 4||3 6 #### 3 6 1\r5 6 * 7 4||5 5 + 0 6 #### 5 5 6\r")
    assert len(load_records(str(text))[0]) == 2


@pytest.mark.parametrize("name, content, says", [
    ("rows.jsonl.gz", None, "is gzip-compressed; decompress it"),
    ("rows.csv", b"question,cot,answer\nq,c,1\n", "is CSV; convert it to .jsonl"),
    ("rows.jsonl", "\ufeff" + '{"question": "q", "cot": "c", "answer": "1"}\n', "is UTF-16 (little-endian); re-save it as UTF-8"),
    ("rows.zip", b"PK\x03\x04rest", "is a zip archive"),
])
def test_a_file_of_another_format_is_named_by_what_it_is(tmp_path, name, content, says):
    import gzip

    path = tmp_path / name
    if content is None:
        path.write_bytes(gzip.compress(GOOD + b"\n"))
    elif isinstance(content, str):
        path.write_bytes(b"\xff\xfe" + content[1:].encode("utf-16-le"))
    else:
        path.write_bytes(content)
    with pytest.raises(RecordError) as error:
        load_records(str(path))
    assert says in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_fifo_and_a_symlink_loop_are_named(tmp_path):
    import os

    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(RecordError, match="is a FIFO; give a"):
        load_records(str(fifo))
    loop = tmp_path / "loop.jsonl"
    os.symlink(loop, loop)
    with pytest.raises(RecordError, match="cannot be opened"):
        load_records(str(loop))
    with pytest.raises(RecordError, match="is a folder"):
        load_records(str(tmp_path))
