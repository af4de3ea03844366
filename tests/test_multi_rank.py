"""Data parallel under the deepspeed launcher with 2 CPU ranks (gloo): same losses as 1 rank at the same global
batch, every row once per epoch, and checkpoints that move between 1 and 2 ranks."""

import json
import shutil
from pathlib import Path

import torch

from tests.test_training import _launch, _losses

ARGS = ["--epochs", "1", "--lr", "1e-3", "--warmup-steps", "1", "--head-width", "32", "--max-latents", "12",
        "--save-every", "3", "--log-ids"]
# the same global batch of 8: 2 ranks x micro 2 x accumulation 2, or 1 rank x micro 4 x accumulation 2
TWO = ["--micro-batch", "2", "--grad-accum", "2"]
ONE = ["--micro-batch", "4", "--grad-accum", "2"]


def _stage1(shards, backbone, out, ranks, *extra):
    args = ["--shards", str(shards), "--backbone", str(backbone), "--out", str(out), *ARGS, *(TWO if ranks == 2 else ONE), *extra]
    return _launch("stage1.py", *args, ranks=ranks)


def _resume_copy(source: Path, target: Path, tag: str = "step3") -> None:
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag, target / "checkpoints" / tag)
    (target / "checkpoints" / "latest").write_text(tag)


def _close(a, b):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-2, atol=1e-4)


def test_two_ranks_match_one_consume_each_row_once_and_resume_across_sizes(tiny_shards, tiny_qwen3_vl, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    _stage1(tiny_shards, tiny_qwen3_vl, two, 2)
    _stage1(tiny_shards, tiny_qwen3_vl, one, 1)
    assert len(_losses(two)) == len(_losses(one)) == 6  # 48 rows / global batch 8
    _close(_losses(two, "mse"), _losses(one, "mse"))
    _close(_losses(two, "lm"), _losses(one, "lm"))

    ids = [i for rank in (0, 1) for line in (two / f"ids-rank{rank}.jsonl").read_text().splitlines()
           for i in json.loads(line)["ids"]]
    rank0 = {i for line in (two / "ids-rank0.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]}
    assert len(ids) == len(set(ids)) == 48 and 0 < len(rank0) < 48

    for source, target, ranks in ((two, tmp_path / "two-to-one", 1), (one, tmp_path / "one-to-two", 2)):
        _resume_copy(source, target)
        result = _stage1(tiny_shards, tiny_qwen3_vl, target, ranks, "--resume")
        assert f"saved on {3 - ranks} ranks, resuming on {ranks}" in result.stdout
        resumed = _losses(target, "mse")
        assert len(resumed) == 3  # steps 4-6
        _close(resumed, _losses(source, "mse")[3:])
