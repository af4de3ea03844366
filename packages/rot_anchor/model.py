"""The anchor's architecture (transformers' Qwen3-VL classes, small) and its byte-level tokenizer.

The tokenizer needs no training data: every byte is a token (digits, letters and punctuation are
one token each), plus Qwen-style chat specials and the vision tokens (``rot_data.tokens``). The vision start/end
tokens are named ``<img_begin>`` / ``<img_end>``, the names RoT uses, so a RoT model built on the anchor
starts from rows the anchor already learned.
"""

from __future__ import annotations

from rot_data.tokens import CHAT_TEMPLATE, END_OF_TEXT, IM_END, IMAGE_PAD, IMG_BEGIN, IMG_END, SPECIAL_TOKENS, VIDEO_PAD

# Sizes: "anchor" is the shipped model (about 11 M parameters, 22 MB of bf16 safetensors: it must ship in
# the package); "micro" is the CPU smoke-test size of the same recipe.
SIZES = {
    "anchor": dict(hidden=384, layers=6, heads=6, kv_heads=2, intermediate=1024,
                   vision_hidden=128, vision_depth=4, vision_heads=4, vision_intermediate=512),
    "micro": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                  vision_hidden=32, vision_depth=1, vision_heads=2, vision_intermediate=64),
}


def byte_backend():
    """A ``tokenizers`` byte-level model with no merges: every byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def chat_tokenizer(backend, additional_special_tokens: list[str]):
    """Wrap a tokenizers backend as a transformers tokenizer with Qwen-style specials and chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=END_OF_TEXT,
                                        additional_special_tokens=additional_special_tokens)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def byte_tokenizer():
    """The anchor's tokenizer: bytes, chat specials and the vision tokens."""
    return chat_tokenizer(byte_backend(), SPECIAL_TOKENS[1:])


def anchor_config(tokenizer, size: str = "anchor"):
    """A Qwen3-VL config of the given size whose vision-token ids are the tokenizer's."""
    from transformers import Qwen3VLConfig

    s = SIZES[size]
    head_dim = s["hidden"] // s["heads"]
    half = head_dim // 2  # mrope splits the rotary frequencies over (t, h, w); text positions use all three alike
    sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections,
                                 "mrope_interleaved": True},
                bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[END_OF_TEXT])
    vision = dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"],
                  num_heads=s["vision_heads"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=s["hidden"], num_position_embeddings=1024, deepstack_visual_indexes=[])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
                         vision_start_token_id=ids[IMG_BEGIN], vision_end_token_id=ids[IMG_END])


def build_anchor(size: str = "anchor", seed: int = 0):
    """(randomly initialised Qwen3VLForConditionalGeneration, tokenizer) of the given size."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = byte_tokenizer()
    config = anchor_config(tokenizer, size)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = None, tokenizer.eos_token_id, tokenizer.pad_token_id
    return model, tokenizer

