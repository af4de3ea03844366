import shutil

import pytest
import torch

from rot_model.shard_stream import ShardError, ShardSet, ShardStream, epoch_order


def _collect(stream, workers=0):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [(b["batch_index"], [i for i, w in zip(b["ids"], b["weights"].tolist()) if w > 0]) for b in loader]


def _ids_only(rows, embeddings):
    return {"ids": [r["id"] for r in rows], "n": torch.tensor([len(e) for e in embeddings])}


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2), (3, 1)])
def test_ranks_and_workers_split_an_epoch_with_no_overlap_and_no_gap(tiny_shards, world_size, workers):
    shard_set = ShardSet.open(tiny_shards)
    seen = []
    for rank in range(world_size):
        stream = ShardStream(shard_set, _ids_only, micro_batch=5, rank=rank, world_size=world_size, seed=3, shuffle_buffer=8)
        batches = _collect(stream, workers)
        assert [b for b, _ in batches] == list(range(stream.batches_per_epoch))  # same step count on every rank
        seen += [i for _, ids in batches for i in ids]
    assert len(seen) == len(set(seen)) == shard_set.rows == 48


def test_order_is_seeded_per_epoch_and_resume_continues_exactly(tiny_shards):
    shard_set = ShardSet.open(tiny_shards)
    stream = ShardStream(shard_set, _ids_only, micro_batch=4, seed=1, shuffle_buffer=8)
    full = _collect(stream)
    stream.set_position(epoch=0, start_batch=5)
    assert _collect(stream) == full[5:]
    stream.set_position(epoch=1)
    assert _collect(stream) != full
    assert epoch_order(shard_set.shard_rows, 1, 0, 8) == epoch_order(shard_set.shard_rows, 1, 0, 8)
    assert sorted(epoch_order(shard_set.shard_rows, 1, 0, 8)) == [(s, r) for s in range(3) for r in range(16)]


class CountingShardSet(ShardSet):
    """The real shard set, counting how often a whole shard is read."""

    reads = 0

    def read_rows(self, index, with_embeddings=True):
        CountingShardSet.reads += 1
        return super().read_rows(index, with_embeddings)


def test_an_epoch_reads_each_shard_once_however_long_rows_wait_in_the_shuffle_buffer(tmp_path):
    from rot_render.pipeline import BuildConfig, build

    build(BuildConfig(encoder="tiny", dataset="gsm8k", out=tmp_path, limit=42, shard_size=3, batch_size=14), progress=False)
    shard_set = CountingShardSet.open(tmp_path)  # 14 shards of 3 rows: rows linger in the buffer across many shards
    stream = ShardStream(shard_set, _ids_only, micro_batch=4, seed=2, shuffle_buffer=12)
    CountingShardSet.reads = 0
    batches = _collect(stream)
    assert CountingShardSet.reads == 14 and len(batches) == 11  # the last batch is topped up with weight-0 fillers
    assert sorted(i for _, ids in batches for i in ids) == sorted(r["id"] for s in range(14) for r in shard_set.read_rows(s))


def test_embeddings_round_trip_with_the_manifest_shapes(tiny_shards):
    shard_set = ShardSet.open(tiny_shards)
    row = shard_set.read_rows(0)[0]
    embedding = shard_set.embedding(row)
    assert embedding.shape == (row["n_tokens"], 64) and embedding.dtype == torch.float32
    assert torch.isfinite(embedding).all() and embedding.abs().sum() > 0


def test_bad_shard_sets_are_refused_with_the_file_and_the_fix(tiny_shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_shards, broken)
    (broken / "shard-00001.parquet").unlink()
    with pytest.raises(ShardError, match=r"shard-00001.parquet is missing; re-run the same rot-render build command"):
        ShardSet.open(broken)
    shutil.copy(tiny_shards / "shard-00000.parquet", broken / "shard-00001.parquet")
    with pytest.raises(ShardError, match=r"shard-00001.parquet does not match its checksum"):
        ShardSet.open(broken)
    with pytest.raises(ShardError, match="nowhere does not exist; build a shard set there first: rot-render build"):
        ShardSet.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()  # never built: not "the build did not finish"
    with pytest.raises(ShardError, match="empty holds no shard set \\(no manifest.json, no shards\\): build one there first"):
        ShardSet.open(tmp_path / "empty")
    (broken / "manifest.json").unlink()  # a build that wrote shards and was killed before its manifest
    with pytest.raises(ShardError, match="manifest.json is missing: the build did not finish; re-run the same rot-render build"):
        ShardSet.open(broken)
    with pytest.raises(ShardError, match="embedding dim 64 but the head in X was trained on dim 32"):
        ShardSet.open(tiny_shards).check_dim(32, "the head in X")


def test_sft_stream_reads_no_embeddings_and_rot_stream_the_stored_ones(tiny_shards, tiny_qwen3_vl):
    from transformers import AutoTokenizer

    from rot_model.batches import RoTCollator, SFTCollator

    seen = {}

    def keep(name, collator):
        def collate(rows, embeddings):
            seen[name] = (rows, embeddings)
            return collator(rows, embeddings)
        collate.reads_embeddings = collator.reads_embeddings
        return collate

    shard_set = ShardSet.open(tiny_shards)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_vl)
    for name, collator in (("sft", SFTCollator(tokenizer, with_cot=True, latent_dim=shard_set.dim)),
                           ("rot", RoTCollator(tokenizer, 1, 2, max_latents=8))):
        next(iter(ShardStream(shard_set, keep(name, collator), micro_batch=3, shuffle_buffer=1)))
    sft_rows, sft_embeddings = seen["sft"]
    rot_rows, rot_embeddings = seen["rot"]
    assert sft_embeddings == [] and all("embedding" not in r for r in sft_rows)
    assert [r["id"] for r in sft_rows] == [r["id"] for r in rot_rows]  # same rows, only the column left out
    assert [tuple(e.shape) for e in rot_embeddings] == [(r["n_tokens"], shard_set.dim) for r in rot_rows]


def test_a_shard_damaged_after_opening_stops_a_worker_with_one_line(tiny_shards, tmp_path):
    """Read inside a DataLoader worker, the error reaches the trainer as the reader's one line, not a worker traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_shards, broken)
    shard_set = ShardSet.open(broken)  # checksums right at the start
    data = bytearray((broken / "shard-00000.parquet").read_bytes())
    data[len(data) // 2] ^= 0x10
    (broken / "shard-00000.parquet").write_bytes(bytes(data))
    stream = ShardStream(shard_set, _ids_only, micro_batch=48, shuffle_buffer=1)
    with pytest.raises(ShardError) as error:
        _collect(stream, workers=1)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{broken / 'shard-00000.parquet'} cannot be read (")
    assert message.endswith("); delete it and re-run rot-render build to remake it")


def test_embedding_codec_round_trips_bit_exact_and_refuses_a_wrong_size():
    from rot_data.shards import decode_embedding, embedding_bytes

    embedding = torch.randn(5, 12)
    for dtype, stored in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        data = embedding_bytes(embedding, dtype)
        assert torch.equal(decode_embedding(data, 5, 12, dtype), embedding.to(stored).float())
    with pytest.raises(ValueError, match=r"40 embedding bytes, not 120 \(5 tokens x dim 12, bf16\)"):
        decode_embedding(b"\0" * 40, 5, 12, "bf16")


def test_batches_hold_rows_of_about_one_length_and_a_one_length_set_keeps_its_order(tiny_shards):
    from rot_model.shard_stream import group_by_length

    shard_set = ShardSet.open(tiny_shards)  # 48 GSM8k rows of different visual-token counts
    length = {r["id"]: r["n_tokens"] for s in range(3) for r in shard_set.read_rows(s, with_embeddings=False)}
    batches = _collect(ShardStream(shard_set, _ids_only, micro_batch=4, seed=1, shuffle_buffer=8))
    grouped = [length[i] for _, ids in batches for i in ids]
    assert grouped == sorted(grouped) and len(set(grouped)) > 5  # one run of 16 batches here: the whole epoch sorted
    # what that saves: each batch rolls out (and pads to) its longest row
    order = epoch_order(shard_set.shard_rows, 1, 0, 8)
    rows = shard_set.row_lengths()
    random_slots = sum(max(rows[s][r] for s, r in order[b:b + 4]) for b in range(0, 48, 4))
    assert sum(max(length[i] for i in ids) for _, ids in batches) < 0.9 * random_slots
    same = [[7] * 16 for _ in range(3)]  # a set of one length (4x4 multiplication: 28 tokens each) is not reordered
    assert group_by_length(order, same, 4) == order
