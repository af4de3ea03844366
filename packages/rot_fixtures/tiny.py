"""Tiny random Qwen-VL checkpoints (real transformers classes) with a byte-level tokenizer.

Nothing can be downloaded on the CPU machines, so tests and GPU smoke runs build their backbones
here: a whole VLM (vision tower + language model) saved as a Hugging Face checkpoint folder that
the trainer loads exactly like a real one. The weights are random; only the shapes are real.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + Qwen-style chat specials) that needs no training data."""
    from rot_anchor.model import byte_backend, chat_tokenizer
    from rot_data.tokens import IM_START

    return chat_tokenizer(byte_backend(), [IM_START])


def bpe_tokenizer(texts, vocab_size: int = 8000):
    """A byte-level BPE tokenizer trained here on ``texts`` (seconds), with the same specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from rot_anchor.model import chat_tokenizer
    from rot_data.tokens import IM_START

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return chat_tokenizer(backend, [IM_START])


def tiny_vlm_config(family: str = "qwen3_vl", hidden_size: int = 64, layers: int = 2, vocab_size: int = 320,
                    vision_dim: int | None = None):
    """Config of a small VLM of the given family; ``vision_dim`` defaults to the LLM hidden size."""
    heads, kv_heads = 4, 2
    head_dim = hidden_size // heads
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, rms_norm_eps=1e-6)
    # mrope sections split head_dim/2 rotary frequencies over (t, h, w)
    half = head_dim // 2
    sections = [half - 2 * (half // 4), half // 4, half // 4]
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": sections, "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=vision_dim or hidden_size, num_position_embeddings=256,
                      deepstack_visual_indexes=[])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=vision_dim or hidden_size,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny family {family}")


def save_tiny_vlm(folder: Path, family: str = "qwen3_vl", hidden_size: int = 64, seed: int = 0, **kwargs) -> Path:
    """Build a random tiny VLM with ``seed`` and save it (safetensors + byte tokenizer) to ``folder``."""
    return save_random_vlm(folder, tiny_vlm_config(family, hidden_size, **kwargs), byte_tokenizer(), seed)


def save_random_vlm(folder: Path, config, tokenizer, seed: int = 0, device: str = "cpu") -> Path:
    """Save a VLM of ``config`` with random (seeded) weights and ``tokenizer`` as a Hugging Face checkpoint folder.

    Build it on a GPU (``device="cuda"``) for paper-sized configs: the speed of a model does not
    depend on its weight values, so benchmarks use these in place of downloads."""
    from transformers import AutoModelForImageTextToText

    folder = Path(folder)
    for sub in (config, config.text_config):
        sub.bos_token_id, sub.eos_token_id, sub.pad_token_id = None, tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16 if device != "cpu" else None)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
