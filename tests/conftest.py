"""Shared fixtures: paths to the benchmark data and tiny real-architecture Qwen-VL checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tiny_vision_configs() -> dict:
    """Tiny random vision towers of the three supported families (transformers config classes)."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    from rot_vision.tower import tiny_vision_config

    return {
        "qwen2_vl": Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2,
                                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        "qwen2_5_vl": Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                             out_hidden_size=40, patch_size=14, spatial_merge_size=2,
                                             temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        "qwen3_vl": tiny_vision_config(),
    }


def invoke(app, args: list[str], exit_code: int = 0):
    """A command (its typer app: the entry point's own) run in this process by typer's test runner, for what needs no
    process of its own: it must end with ``exit_code`` and without a traceback. The result (.stdout, .stderr)."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, args)
    assert result.exit_code == exit_code and (result.exception is None or isinstance(result.exception, SystemExit)), \
        (result.exception, result.output[-2000:])
    return result


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder that ships in the package (the same layout as ../shared/data): nothing is skipped on a clone."""
    from rot_data.records import PACKAGE_DATA

    return PACKAGE_DATA


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory) -> Path:
    """A whole tiny Qwen3-VL model (vision tower + language model, hidden 64) saved as a HF checkpoint."""
    from rot_fixtures.tiny import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen3-vl"), "qwen3_vl", hidden_size=64, seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL (legacy 'visual.' / 'model.layers.' keys), hidden 48: a second backbone size."""
    from rot_fixtures.tiny import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen2_5-vl"), "qwen2_5_vl", hidden_size=48, seed=1)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """48 GSM8k rows encoded by the tiny tower (dim 64) through the real Ray job, in 3 shards."""
    from rot_render.pipeline import BuildConfig, build

    out = tmp_path_factory.mktemp("shards") / "gsm8k-tiny"
    build(BuildConfig(encoder="tiny", dataset="gsm8k", out=out, limit=48, shard_size=16, batch_size=16), progress=False)
    return out


@pytest.fixture(scope="session")
def micro_anchor(tmp_path_factory) -> Path:
    """A randomly initialised anchor of the micro size (a real Qwen3-VL with the anchor's tokenizer, hidden 64)."""
    from rot_anchor.model import build_anchor

    model, tokenizer = build_anchor("micro", seed=0)
    folder = tmp_path_factory.mktemp("micro-anchor")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _ray_stops_before_the_summary():
    """Ray, started in this process by in-process builds, prints its actors' errors when it shuts down (the fault
    tests kill encoders on purpose): shut it down here, so the run ends on pytest's own summary."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
