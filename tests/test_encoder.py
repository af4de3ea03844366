import numpy as np
import pytest
import torch

from rot_vision.tower import EncoderSource, VisionEncoder, read_encoder_source, CLIP_MEAN, CLIP_STD
from rot_vision.render import RenderSettings, render_line
from tests.conftest import tiny_vision_configs

LINES = ["Natalia sold 48/2 = 24 clips in May.", "48+24 = 72", "x", "She earned 0.2 x 50 = $10 in total for the work."]


def _tiny_encoder(family, dtype=torch.float32):
    config = tiny_vision_configs()[family]
    torch.manual_seed(0)
    from rot_vision.tower import _tower_class
    state = _tower_class(family)._from_config(config).state_dict()
    return VisionEncoder(EncoderSource(family, family, config, state, None, CLIP_MEAN, CLIP_STD), dtype=dtype)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_each_family_encodes_a_line_to_width_over_token_px(family):
    encoder = _tiny_encoder(family)
    image = render_line(LINES[0], RenderSettings(), encoder.token_px)
    (embedding,) = encoder.encode([image])
    expected_dim = {"qwen2_vl": 48, "qwen2_5_vl": 40, "qwen3_vl": 64}[family]
    assert embedding.shape == (image.shape[1] // encoder.token_px, expected_dim)
    assert torch.isfinite(embedding).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_equals_one_image_at_a_time(family):
    encoder = _tiny_encoder(family, torch.bfloat16)
    images = [render_line(text, RenderSettings(), encoder.token_px) for text in LINES]
    packed = encoder.encode(images)
    single = [encoder.encode([image])[0] for image in images]
    for a, b, image in zip(packed, single, images):
        assert a.shape == b.shape == (image.shape[1] // encoder.token_px, encoder.dim)
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)  # bf16 tolerance
    assert not torch.allclose(packed[0][:2].float(), packed[1][:2].float())  # images differ, so do embeddings


def test_patchify_matches_the_hugging_face_processor_without_resizing():
    try:  # transformers >= 5.x without torchvision: the PIL backend
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Processor
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as Processor

    encoder = _tiny_encoder("qwen2_vl")
    grey = render_line(LINES[0], RenderSettings(), encoder.token_px)
    ours, grid = encoder.patchify(grey)
    processor = Processor(do_resize=False, patch_size=14, merge_size=2, temporal_patch_size=2,
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    theirs = processor(images=[np.stack([grey] * 3, axis=-1)], return_tensors="pt")
    assert tuple(theirs["image_grid_thw"][0].tolist()) == grid
    torch.testing.assert_close(ours, theirs["pixel_values"].float(), atol=1e-5, rtol=1e-5)


def test_only_the_vision_tower_is_read_from_a_checkpoint(tiny_qwen3_vl):
    from transformers import Qwen3VLForConditionalGeneration

    source = read_encoder_source(str(tiny_qwen3_vl))
    assert source.model_type == "qwen3_vl" and source.dim == 64
    assert not any("language_model" in k or k.startswith("lm_head") for k in source.state_dict)
    encoder = VisionEncoder(source)
    full = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl).eval()
    image = render_line(LINES[1], RenderSettings(), encoder.token_px)
    patches, grid = encoder.patchify(image)
    with torch.no_grad():
        reference = full.model.visual(patches, grid_thw=torch.tensor([grid])).pooler_output
    torch.testing.assert_close(encoder.encode([image])[0], reference)


def test_a_checkpoint_without_a_supported_tower_is_refused_in_one_line(tmp_path):
    from transformers import Qwen3Config

    Qwen3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, vocab_size=128).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^--encoder: model type 'qwen3' is not supported; use a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint$"):
        read_encoder_source(str(tmp_path))


def test_tiny_preset_is_seeded_and_marked_untrained():
    a, b = read_encoder_source("tiny"), read_encoder_source("tiny")
    assert a.untrained and a.weights_sha256 == b.weights_sha256
    assert a.describe("sdpa", "float32")["untrained"] is True


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_packed_attention_equals_per_image_sdpa(family):
    from rot_vision.tower import PACKED

    sdpa = _tiny_encoder(family)
    packed = VisionEncoder(sdpa.source, attn_implementation=PACKED)
    assert packed.tower.config._attn_implementation == PACKED
    images = [render_line(text, RenderSettings(), sdpa.token_px) for text in LINES]
    for a, b in zip(sdpa.encode(images), packed.encode(images)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_linear_patch_embedding_equals_the_conv3d_it_replaces(family):
    from rot_vision.tower import _tower_class

    encoder = _tiny_encoder(family)
    stock = _tower_class(family)._from_config(tiny_vision_configs()[family]).patch_embed
    stock.load_state_dict(encoder.tower.patch_embed.state_dict())
    assert isinstance(stock.proj, torch.nn.Conv3d) and "forward" in vars(encoder.tower.patch_embed)  # ours is replaced
    patches, _ = encoder.patchify(render_line(LINES[1], RenderSettings(), encoder.token_px))
    with torch.no_grad():
        torch.testing.assert_close(encoder.tower.patch_embed(patches), stock(patches), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_equal_widths_merged_into_one_entry_give_the_per_image_result(family):
    """The pack is sorted by width and equal widths go to the tower as one multi-frame entry (transformers' per-entry
    Python work runs once per width); the result, in the caller's order, is what each image gives alone."""
    from rot_vision.tower import grid_thw_for

    encoder = _tiny_encoder(family)
    texts = ["1 2 3", "45 + 6 = 51", "7 8 9", "x", "4 5 6", "45 + 6 = 51"]
    images = [render_line(text, RenderSettings(), encoder.token_px) for text in texts]
    grids = sorted(encoder.grey_patches(image)[1] for image in images)
    assert len(grid_thw_for(encoder.tower, grids, "cpu")) < len(set(texts))  # some entries were merged
    packed = encoder.encode(images)
    for image, embedding in zip(images, packed):
        torch.testing.assert_close(embedding, encoder.encode([image])[0], atol=1e-5, rtol=1e-5)
