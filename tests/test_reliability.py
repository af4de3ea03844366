"""Issue 14, nothing silently wrong: a re-run re-checks what it keeps, and a damaged shard set is never reported clean."""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rot_data.records import load_records
from rot_render import shards
from rot_render.pipeline import BuildConfig, build
from rot_train.shard_stream import ShardError, ShardSet


def _flip_byte(path: Path, where: float = 0.5) -> None:
    """Flip one bit in the middle of the file: inside the embedding pages, where pyarrow alone reads on without error."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def _tiny_config(out: Path, **overrides) -> BuildConfig:
    """The settings of the tiny_shards fixture (conftest.py)."""
    return BuildConfig(**dict(dict(dataset="gsm8k", out=out, limit=48, shard_size=16, batch_size=16), **overrides))


def test_rebuild_reencodes_a_damaged_shard_instead_of_rehashing_it(tiny_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    damaged = copy / "shard-00001.parquet"
    _flip_byte(damaged)
    # the build's checker and the trainer's reader both refuse it
    assert shards.verify(copy) == [f"{damaged} checksum differs from the manifest; re-run the same rot-render build command to remake it"]
    with pytest.raises(ShardError, match="does not match its checksum"):
        ShardSet.open(copy)
    with pytest.raises(ShardError, match=r"shard-00001.parquet cannot be read \(.*\); delete it and re-run"):
        ShardSet.open(copy, verify=False).read_rows(1)  # the pages' CRC catches it even without the manifest

    manifest = build(_tiny_config(copy), progress=False)
    assert manifest["run"]["encoded_rows"] == 16 and manifest["run"]["resumed_shards"] == 2
    assert manifest["run"]["reencoded_damaged"] == ["shard-00001.parquet (checksum differs from the manifest)"]
    assert shards.verify(copy) == [] and ShardSet.open(copy).rows == 48
    original = pq.read_table(tiny_shards / "shard-00001.parquet")
    remade = pq.read_table(damaged)
    assert remade["id"].equals(original["id"]) and remade["n_tokens"].equals(original["n_tokens"])


def test_killed_build_keeps_only_shards_that_read_back_whole(tiny_shards, tmp_path):
    """No manifest yet (the build was killed): a kept shard must read back with every page CRC right and the planned rows."""
    from rot_render.pipeline import _kept_shards

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    fingerprint = shards.read_manifest(copy)["fingerprint"]
    (copy / shards.MANIFEST).unlink()
    _flip_byte(copy / "shard-00000.parquet")
    (copy / "shard-00002.parquet").write_bytes((copy / "shard-00002.parquet").read_bytes()[:-100])  # cut short
    records, _ = load_records("gsm8k")
    plan = [records[i:i + 16] for i in range(0, 48, 16)]
    kept, damaged = _kept_shards(_tiny_config(copy), fingerprint, plan)
    assert sorted(kept) == [1] and kept[1]["sha256"] == shards.file_sha256(copy / "shard-00001.parquet")
    assert [d.split(" ")[0] for d in damaged] == ["shard-00000.parquet", "shard-00002.parquet"]
    assert sorted(p.name for p in copy.glob("shard-*")) == ["shard-00001.parquet"]  # the damaged ones go, to be re-encoded
    # a shard with the right settings but other rows (e.g. another plan) is not kept either
    swapped = [plan[0], plan[0], plan[2]]
    assert _kept_shards(_tiny_config(copy), fingerprint, swapped) == ({}, ["shard-00001.parquet (holds other rows than planned)"])


def _write_rows(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_an_edited_source_is_refused_until_overwrite_and_then_encoded(tmp_path):
    """The fingerprint covers the rows: editing the source is not answered by 'shards kept'."""
    from rot_render.pipeline import BuildError

    records, _ = load_records("gsm8k")
    rows = [{"question": r.question, "cot": r.cot, "answer": r.answer} for r in records[:6]]
    source = _write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "shards"
    config = BuildConfig(dataset=str(source), out=out, shard_size=3, batch_size=3)
    first = build(config, progress=False)
    assert build(config, progress=False)["run"]["encoded_rows"] == 0  # unchanged: nothing to do

    rows[4]["cot"] = "48 / 2 = 24 and 48 + 24 = 72"
    _write_rows(source, rows)
    with pytest.raises(BuildError) as error:
        build(config, progress=False)
    assert str(error.value) == (f"{out / 'manifest.json'} was made with other rows of {source} (the source changed since); "
                                f"pass --overwrite to replace the shard set in {out}, or choose another --out")
    again = build(BuildConfig(dataset=str(source), out=out, shard_size=3, batch_size=3, overwrite=True), progress=False)
    assert again["fingerprint"] != first["fingerprint"] and again["run"]["encoded_rows"] == 6
    assert pq.read_table(out / "shard-00001.parquet")["cot"][1].as_py() == rows[4]["cot"]
    assert shards.verify(out) == []
