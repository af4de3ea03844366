"""Data parallel under the deepspeed launcher with 2 CPU ranks (gloo): same losses as 1 rank at the same global
batch, every row once per epoch, and checkpoints that move between 1 and 2 ranks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rot_model.export import load_export
from rot_train.train import TrainConfig, run
from tests.test_training import ROOT, _launch, _losses

pytestmark = pytest.mark.slow  # Ray / DeepSpeed launcher runs: pytest -m 'not slow' skips them

# a cap above some rows' token counts: ranks then hold micro-batches with different numbers of latent slots
ARGS = ["--epochs", "1", "--lr", "1e-3", "--warmup-steps", "1", "--head-width", "32", "--max-latents", "40",
        "--save-every", "3", "--log-ids"]
# the same global batch of 8: 2 ranks x micro 2 x accumulation 2, or 1 rank x micro 4 x accumulation 2
TWO = ["--global-batch", "8", "--micro-batch", "2"]
ONE = ["--global-batch", "8", "--micro-batch", "4"]


def _stage1(shards, backbone, out, ranks, *extra):
    args = ["--shards", str(shards), "--backbone", str(backbone), "--out", str(out), *ARGS, *(TWO if ranks == 2 else ONE), *extra]
    return _launch("stage1", *args, ranks=ranks)


def _one_rank_reference(shards, backbone, out: Path, max_latents: int) -> Path:
    """ARGS' Stage I on 1 rank at ONE's global batch, ZeRO-2, in this process (a launch costs ~20 s more)."""
    run(TrainConfig(stage=1, shards=str(shards), backbone=str(backbone), out=str(out), epochs=1, lr=1e-3, warmup_steps=1,
                    head_width=32, max_latents=max_latents, save_every=3, global_batch=8, micro_batch=4))
    return out


@pytest.fixture(scope="module")
def one_rank(tiny_shards, tiny_qwen3_vl, tmp_path_factory) -> Path:
    """The 1-rank ZeRO-2 Stage I run the 2-rank runs are compared with."""
    return _one_rank_reference(tiny_shards, tiny_qwen3_vl, tmp_path_factory.mktemp("one-rank") / "one", max_latents=40)


def _resume_copy(source: Path, target: Path, tag: str = "step3") -> None:
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag, target / "checkpoints" / tag)
    (target / "checkpoints" / "latest").write_text(tag)


def _close(a, b):
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-2, atol=1e-4)


def _shared_memory_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_two_ranks_match_one_consume_each_row_once_and_resume_on_more_ranks(tiny_shards, tiny_qwen3_vl, one_rank, tmp_path):
    two = tmp_path / "two"
    shared_before = _shared_memory_files()
    _stage1(tiny_shards, tiny_qwen3_vl, two, 2)
    assert _shared_memory_files() - shared_before == set()  # DeepSpeed's CPU all-reduce buffers do not outlive a run
    assert len(_losses(two)) == len(_losses(one_rank)) == 6  # 48 rows / global batch 8
    _close(_losses(two, "mse"), _losses(one_rank, "mse"))
    _close(_losses(two, "lm"), _losses(one_rank, "lm"))

    ids = [i for rank in (0, 1) for line in (two / f"ids-rank{rank}.jsonl").read_text().splitlines()
           for i in json.loads(line)["ids"]]
    rank0 = {i for line in (two / "ids-rank0.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]}
    assert len(ids) == len(set(ids)) == 48 and 0 < len(rank0) < 48

    # 1 rank -> 2 here; 2 ranks -> 1 in the ZeRO-3 test below
    resumed = tmp_path / "one-to-two"
    _resume_copy(one_rank, resumed)
    result = _stage1(tiny_shards, tiny_qwen3_vl, resumed, 2, "--resume")
    assert "saved on 1 ranks, resuming on 2" in result.stdout
    assert len(_losses(resumed, "mse")) == 3  # steps 4-6
    _close(_losses(resumed, "mse"), _losses(one_rank, "mse")[3:])


def test_zero3_partitions_matches_zero2_exports_whole_weights_and_resumes_on_one_rank(tiny_shards, tiny_qwen3_vl, tmp_path):
    """12 latent slots, not 40: ZeRO-3 fetches and releases every layer's weights at each latent of the rollout, and
    its first step traces that order in time that grows faster than the rollout (19 s at 40 slots here, 3.6 s at 12)."""
    config = json.loads((ROOT / "packages/rot_train/configs/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny model's tensors
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps(config))
    short = ["--max-latents", "12"]  # after ARGS' 40: the last one given wins
    one_rank = _one_rank_reference(tiny_shards, tiny_qwen3_vl, tmp_path / "zero2-one", max_latents=12)
    two = tmp_path / "two-zero3"
    _stage1(tiny_shards, tiny_qwen3_vl, two, 2, *short, "--ds-config", str(zero3))
    assert len(list((two / "checkpoints" / "step3").glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2
    _close(_losses(two, "mse"), _losses(one_rank, "mse"))
    _close(_losses(two, "lm"), _losses(one_rank, "lm"))
    # the export holds whole tensors gathered from both ranks, equal to the 1-rank ZeRO-2 run's
    ours, reference = (load_file(folder / "export" / "head.safetensors") for folder in (two, one_rank))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], atol=2e-2, rtol=2e-2)

    resumed = tmp_path / "zero3-two-to-one"
    _resume_copy(two, resumed)
    result = _stage1(tiny_shards, tiny_qwen3_vl, resumed, 1, *short, "--ds-config", str(zero3), "--resume")
    assert "saved on 2 ranks, resuming on 1" in result.stdout
    _close(_losses(resumed, "mse"), _losses(two, "mse")[3:])

    stage2 = tmp_path / "stage2-zero3"
    args = ["--shards", str(tiny_shards), "--backbone", str(tiny_qwen3_vl), "--out", str(stage2), "--init", str(two / "export"),
            *ARGS, *short, *TWO, "--max-steps", "3", "--ds-config", str(zero3)]  # 3: the warm-up gives the first steps lr 0
    _launch("stage2", *args, ranks=2)
    model, _, exported = load_export(stage2 / "export")
    lora = [p for n, p in model.lm.named_parameters() if "lora_B" in n]
    assert exported["weights"] == "lora" and lora and all(p.abs().sum() > 0 for p in lora)  # trained, not empty slices
