"""The Ray job end to end on this CPU: shards, manifest, resume after a kill, refusal of mixed settings."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rot_data import shards
from rot_vision.tower import VisionEncoder
from rot_render.pipeline import BuildConfig, BuildError, build
from tests.conftest import invoke
from rot_data.records import load_records
from rot_vision.render import RenderSettings, render_line

pytestmark = pytest.mark.slow  # Ray / DeepSpeed launcher runs: pytest -m 'not slow' skips them


def _ids(out: Path) -> list[str]:
    return [i for p in sorted(out.glob("shard-*.parquet")) for i in pq.read_table(p, columns=["id"])["id"].to_pylist()]


def _cli(*args):
    """`rot-render ARGS` as its own process, as a user runs it (Ray starts and stops with a build); it must succeed."""
    return subprocess.run(["rot-render", *args], capture_output=True, text=True, check=True)


def _invoke(*args, exit_code=0):
    """`rot-render ARGS` in this process, for what ends before Ray starts (or starts none)."""
    from rot_render.cli import app

    return invoke(app, list(args), exit_code)


def test_build_writes_verified_shards_and_resumes_without_rewriting(tmp_path):
    out = tmp_path / "shards"
    manifest = build(BuildConfig(encoder="tiny", dataset="gsm8k", out=out, limit=40, shard_size=16, batch_size=8), progress=False)
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 8]
    assert manifest["rows"] == 40 and manifest["encoder"]["untrained"] is True
    import ray  # the build turned off Ray Data's per-operator reservation (it held 4 GPUs' render tasks to ~20 of 64 cores)
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is False or "RAY_DATA_ENABLE_OP_RESOURCE_RESERVATION" in os.environ
    records, _ = load_records("gsm8k")
    assert _ids(out) == [r.id for r in records[:40]]  # source order inside and across shards

    # stored embeddings are what the encoder gives for that row, to bf16 rounding (the job packs 8 images a call)
    table = pq.read_table(out / "shard-00000.parquet")
    row = table.slice(3, 1).to_pylist()[0]
    encoder = VisionEncoder.from_pretrained("tiny")
    image = render_line(records[3].cot, RenderSettings(), 32)
    expected = encoder.encode([image])[0]
    stored = torch.frombuffer(bytearray(row["embedding"]), dtype=torch.bfloat16).view(row["n_tokens"], 64)
    assert row["image_width"] == image.shape[1] and row["n_tokens"] == image.shape[1] // 32
    torch.testing.assert_close(stored.float(), expected, atol=1e-3, rtol=8e-3)
    # and the bytes round-trip bit for bit
    assert torch.equal(torch.frombuffer(bytearray(shards.embedding_bytes(expected, "bf16")), dtype=torch.bfloat16).view_as(expected),
                       expected.to(torch.bfloat16))
    assert pq.ParquetFile(out / "shard-00000.parquet").metadata.row_group(0).column(6).compression == "ZSTD"

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    again = build(BuildConfig(encoder="tiny", dataset="gsm8k", out=out, limit=40, shard_size=16, batch_size=8), progress=False)
    assert again["run"]["encoded_rows"] == 0 and again["run"]["resumed_shards"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == mtimes
    assert again["fingerprint"] == manifest["fingerprint"]

    result = _invoke("inspect", str(out))
    assert "OK, 3 shards verified" in result.stdout and "UNTRAINED" in result.stdout

    with pytest.raises(BuildError, match="made with different settings.*--overwrite"):
        build(BuildConfig(encoder="tiny", dataset="gsm8k", out=out, limit=40, shard_size=16, dtype="fp32"), progress=False)
    replaced = build(BuildConfig(encoder="tiny", dataset="gsm8k", out=out, limit=40, shard_size=16, dtype="fp32", overwrite=True),
                     progress=False)
    assert replaced["embedding"]["dtype"] == "fp32" and _ids(out) == [r.id for r in records[:40]]

    (out / "shard-00001.parquet").write_bytes(b"corrupt")
    result = _invoke("inspect", str(out), exit_code=1)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: {out / 'shard-00001.parquet'} does not match its checksum in {out / 'manifest.json'} (corrupt or changed); "
                                     "re-run the same rot-render build command to remake it")


def test_skipped_rows_are_counted_in_the_manifest(tmp_path):
    source = tmp_path / "rows.jsonl"
    source.write_text('{"question": "q1", "cot": "1 + 1 = 2", "answer": "2"}\n{"question": "q2", "cot": "", "answer": "3"}\n')
    out = tmp_path / "shards"
    failed = _invoke("build", "--encoder", "tiny", "--dataset", str(source), "--out", str(out), exit_code=1)
    assert failed.exit_code == 1
    assert failed.stderr.strip().splitlines()[-1] == f"error: {source}:2: empty CoT (this source has nothing to render); fix the row or pass --on-error skip"
    built = _cli("build", "--encoder", "tiny", "--dataset", str(source), "--out", str(out), "--on-error", "skip")
    # Ray's lines that mean nothing to this job's user stay out of its output (issue 14.8)
    noise = ("Token authentication is enabled", "Progress bars disabled", "execution finished", "Deprecat",
             "core_worker.cc", " E ")  # no error-level line on a build that succeeds
    assert not [line for line in (built.stdout + built.stderr).splitlines() if any(n in line for n in noise)]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 1 and manifest["skipped_rows"] == 1
    assert manifest["skipped"] == [{"file": str(source), "line": 2, "reason": "empty CoT (this source has nothing to render)"}]


def test_two_encoder_actors_write_the_same_shards_as_one(tmp_path):
    """Bit for bit: each CPU encoder runs the same number of torch threads whatever their number (the float results
    depend on it), so a build resumed with another --num-encoders, or on another machine, writes the same bytes."""
    one = build(BuildConfig(encoder="tiny", dataset="gsm8k", out=tmp_path / "one", limit=24, shard_size=12, batch_size=4, num_encoders=1),
                progress=False)
    two = build(BuildConfig(encoder="tiny", dataset="gsm8k", out=tmp_path / "two", limit=24, shard_size=12, batch_size=4, num_encoders=2),
                progress=False)
    assert two["run"]["encoders"] == 2 and one["fingerprint"] == two["fingerprint"]
    assert one["encoder"]["cpu_threads"] == 2  # recorded: shards made with another count are never mixed in
    for name in ("shard-00000.parquet", "shard-00001.parquet"):
        a, b = (pq.read_table(tmp_path / side / name).to_pylist() for side in ("one", "two"))
        assert [(r["id"], r["n_tokens"], r["embedding"]) for r in a] == [(r["id"], r["n_tokens"], r["embedding"]) for r in b]


def test_steady_rate_leaves_out_start_up_and_stragglers():
    from rot_render.pipeline import steady_rate

    # 10 rows a second once the actors are up (first batch at t=5), then a slow last batch
    arrivals = [(5.0 + i, 10 * (i + 1)) for i in range(9)] + [(30.0, 100), (30.5, 100)]
    assert steady_rate(arrivals) == 10.0
    assert steady_rate([(2.0, 50), (4.0, 150)]) == 50.0  # two batches: first to last
    assert steady_rate([(1.0, 5)]) == 0.0


def test_shard_writer_takes_its_rows_from_mixed_pieces_in_source_order(tmp_path):
    """Encoded packs arrive in any order and straddle shards: each leaves one piece per shard on its node (the driver
    gets only the rows' shard, piece and node), and the shard's writer takes its pieces' rows in source order."""
    import pyarrow as pa
    import ray

    from rot_render import pieces
    from rot_render.pipeline import write_shard_from_pieces

    def pack(rows):  # rows: (shard, position)
        return pa.table({"id": [f"s{s}-p{p}" for s, p in rows], "question": ["q"] * len(rows), "cot": ["c"] * len(rows),
                         "answer": ["a"] * len(rows), "n_tokens": pa.array([1] * len(rows), pa.int32()),
                         "image_width": pa.array([8] * len(rows), pa.int32()),
                         "embedding": pa.array([bytes([p, s]) for s, p in rows], pa.large_binary()),
                         "shard": [s for s, _ in rows], "position": [p for _, p in rows]})

    pieces.folder(tmp_path).mkdir()
    late = pieces.stash(pack([(1, 2), (2, 0), (1, 0)]), tmp_path, "node-a")
    early = pieces.stash(pack([(0, 3), (1, 1), (2, 1)]), tmp_path, "node-b")
    assert late.column_names == ["shard", "piece", "node"] and late["piece"].to_pylist() == ["1-0.arrow", "2-0.arrow", "1-0.arrow"]
    assert early["node"].to_pylist() == ["node-b"] * 3
    summary, node = ray.get(ray.remote(write_shard_from_pieces).remote(tmp_path, 1, ["1-0.arrow", "1-1.arrow"], 3, "fp", 1, "bf16"))
    table = pq.read_table(tmp_path / "shard-00001.parquet")
    assert table["id"].to_pylist() == ["s1-p0", "s1-p1", "s1-p2"] and summary["rows"] == 3
    assert table["embedding"].to_pylist() == [bytes([0, 1]), bytes([1, 1]), bytes([2, 1])]
    assert table.column_names == shards.SCHEMA.names  # bookkeeping columns are not stored
    assert node == ray.get_runtime_context().get_node_id()
    assert sorted(p.name for p in pieces.folder(tmp_path).iterdir()) == ["0-3.arrow", "2-0.arrow", "2-1.arrow"]  # its pieces gone
    with pytest.raises(RuntimeError, match=r"the pieces \['2-0.arrow'\] in .* hold 1 rows, not positions 0..1"):
        pieces.gather(tmp_path, ["2-0.arrow"], 2)


def test_inspect_read_transcribes_stored_rows_against_their_cot(tmp_path, tiny_qwen3_vl):
    """`rot-render inspect --read N`: the shipped anchor reads N rows' stored embeddings of the main job's own data
    (GSM8k solutions) back as their CoT; a reader of another width and a bad N are one-line errors."""
    rows = tmp_path / "gsm8k-12.jsonl"
    source = Path(shards.__file__).parent / "data" / "gsm8k" / "test.jsonl"  # shipped
    rows.write_text("".join(source.read_text().splitlines(True)[:12]))
    from typer.testing import CliRunner

    from rot_render.cli import app
    from rot_render.readcheck import read_shards

    out = tmp_path / "shards"
    build(BuildConfig(dataset=str(rows), out=out), progress=False)  # the default encoder: the anchor's tower
    result = invoke(app, ["inspect", str(out), "--read", "6"])
    found = re.search(r"read back 6 rows with anchor: ([\d.]+)% of (\d+) characters", result.output)
    assert result.exit_code == 0 and found and float(found.group(1)) >= 97.0, result.output
    assert "drawn: " in result.output and "read:  " in result.output

    with pytest.raises(ValueError, match="takes 64-wide visual tokens but .* stores 384-wide ones"):
        read_shards(out, 2, reader=str(tiny_qwen3_vl))
    zero = CliRunner().invoke(app, ["inspect", str(out), "--read", "0"])
    assert zero.exit_code == 1 and "--read 0" in zero.output, zero.output


def test_a_build_keeps_the_users_files_refuses_a_held_folder_and_ignores_stale_scratch(tmp_path):
    """One writer per folder: a build into a folder another process holds is refused in one line, before any work;
    a foreign Parquet under a shard's name is refused, not overwritten; a user's dot-file survives; a stale
    .encoder-starts (left by builds killed with SIGKILL) does not fail the next build."""
    import pyarrow as pa

    from rot_render.pipeline import STARTS

    rows = tmp_path / "rows.txt"
    rows.write_text("\n".join(f"{a} * 5||{a} #### {a}" for a in range(1, 9)) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    notes = out / ".shard-plan.tmp-notes"
    notes.write_text("mine")
    pq.write_table(pa.table({"x": [1, 2]}), out / "shard-00000.parquet")
    foreign = _invoke("build", "--dataset", str(rows), "--out", str(out), "--encoder", "tiny", exit_code=1)
    assert foreign.exit_code == 1 and "shard-00000.parquet is a Parquet file that rot-render did not write" in foreign.stderr
    assert len(foreign.stderr.strip().splitlines()) <= 2  # the tiny-tower note and the error
    (out / "shard-00000.parquet").unlink()
    (out / STARTS).write_text("x\n" * 10)  # more starts than any build allows
    holder = subprocess.Popen(["python", "-c", "import time; from pathlib import Path; from rot_data import locks\n"
                               f"with locks.exclusive(Path({str(out)!r}), 'rot-render build --dataset other'):\n"
                               "    print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.perf_counter()  # in this process from here: the command line's one-line form is shown above
    with pytest.raises(BuildError, match=r"is in use by rot-render build --dataset other \(pid"):
        build(BuildConfig(encoder="tiny", dataset=str(rows), out=out), progress=False)
    assert time.perf_counter() - started < 5  # refused before any work
    holder.kill()
    holder.wait()
    build(BuildConfig(encoder="tiny", dataset=str(rows), out=out), progress=False)
    assert notes.read_text() == "mine" and len(_ids(out)) == 8
    with pytest.raises(BuildError, match="is a file, not a folder"):
        build(BuildConfig(encoder="tiny", dataset=str(rows), out=notes), progress=False)


def test_the_ray_noise_filter_cuts_only_the_constructor_argument_line():
    from rot_render.ray_output import without_noise

    ray_line = (b"[2026-12-03 17:53:01,855 E 8709 8709] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
                b"render_batch)->MapBatches(EncodeBatch))' and ID: 'e2c3' has constructor arguments in the object store and "
                b"max_restarts > 0. If the arguments ... for more details.\n")
    bar = b"\rrender+encode:   0%|          | 0/7473 [00:00<?, ?row/s]"
    assert without_noise(bar + ray_line + bar) == bar + bar  # inside the bar's line, as it appears
    other = b"[2026-12-03 17:53:02,000 E 8709 8709] core_worker.cc:100: a real error\n"
    assert without_noise(other + ray_line + b"done\n") == other + b"done\n"
