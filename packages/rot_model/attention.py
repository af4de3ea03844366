"""The backbone's attention: transformers' SDPA, except that a decode step reads the grouped KV cache without copying it.

Qwen3 shares each key/value head among several query heads (grouped-query attention). With an attention mask, the
SDPA path of transformers 5.17 (the GPU image's) first expands the keys and values to one copy per query head
(``repeat_kv``): during a rollout that copies the whole static cache, every layer, every latent step. On one H200 at
the 4B shape that copy was the largest kernel of a Stage I step (28% of GPU time at 32 latents, 54% uncapped:
docs/benchmarks.md, "Where the time goes"). A step has one query per head, so the query heads of a group can stand
in for query positions instead: queries [batch, kv heads, group, dim] against keys [batch, kv heads, cache, dim],
the mask broadcast over the group: the same numbers, no copy (newer transformers do the same, ``pack_gqa``).
Everything else (prefill, the padded teacher-forced passes, no mask, per-head masks) goes to transformers' own SDPA.

A packed call (``RoTModel`` with packing on: the rows' real tokens as one sequence [1, T], ``cu_seq_lens_q`` their
bounds, keywords the model forwards to every layer's attention) runs causal attention within each row only: on CUDA in
one ``varlen_attn`` call (flash attention inside PyTorch), elsewhere one SDPA call per run of equal-length rows
(``rot_vision.packed_attention.attend``, which packs the tower's images too).
``no_mask`` keeps transformers from building a [T, T] block mask for it.
"""

from __future__ import annotations

import torch.nn.functional as F

NAME = "rot_sdpa"  # the backbone's attn_implementation (rot_model.backbone.load_backbone)


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query [batch, heads, q, dim], key/value [batch, kv heads, k, dim] -> ([batch, q, heads, dim], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("cu_seq_lens_q") is not None:
        return packed(query, key, value, kwargs["cu_seq_lens_q"], kwargs.get("max_length_q"), scaling,
                      kwargs.get("sliding_window")), None
    group = getattr(module, "num_key_value_groups", 1)
    batch, heads, length, dim = query.shape
    if group == 1 or length != 1 or attention_mask is None or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    grouped = query.reshape(batch, heads // group, group, dim)  # heads h*group..h*group+group-1 share kv head h
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return output.reshape(batch, 1, heads, dim), None


def packed(query, key, value, cu_seq_lens, longest, scaling, sliding_window=None):
    """Causal attention within each sequence of a pack: query [1, heads, T, dim], key/value [1, kv heads, T, dim],
    sequence i at ``cu_seq_lens[i]:cu_seq_lens[i + 1]`` -> [1, T, heads, dim] (the tower's packed attention, causal)."""
    from rot_vision.packed_attention import attend

    if sliding_window is not None:
        raise ValueError("--packing: this backbone has sliding-window layers, which packed attention does not run; "
                         "use --no-packing")
    return attend(query, key, value, cu_seq_lens, longest, scaling, causal=True)


def cannot_pack(config) -> str | None:
    """Why a backbone's passes cannot be packed (its attention, sliding-window layers), or None if they can."""
    if config._attn_implementation != NAME:
        return f"its attention is {config._attn_implementation}, not {NAME}"
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return "it has sliding-window layers, which packed attention does not run"
    return None


def no_mask(config) -> dict:
    """The attention masks of a packed call, one per layer type, all None: Qwen2/Qwen3 models take such a mapping as
    masks already made (``generate`` passes them so) and build none. Given nothing, transformers would detect the
    packing from the restarting positions and build a [T, T] block mask; the packed attention needs none."""
    return dict.fromkeys(getattr(config, "layer_types", None) or ["full_attention"])


def register() -> str:
    """Make ``NAME`` an attention implementation (and its masks SDPA's) for models built after this call."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # without it transformers would drop 2-D masks
    return NAME
