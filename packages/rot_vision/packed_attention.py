"""One attention call per layer for a whole pack of images.

In transformers, the Qwen-VL towers' SDPA path splits a pack by ``cu_seqlens`` and runs one
attention call per image per layer; only "flash" implementations take the whole pack at once, and
flash-attn is often not installed. This registers ``flash_packed_sdpa``: on CUDA it calls PyTorch's
variable-length kernel (``torch.nn.attention.varlen.varlen_attn``, flash-attention inside PyTorch),
also in training where that kernel has a backward (the anchor's pretraining packs hundreds of lines of
different widths); otherwise (the CPU) one batched SDPA call per run of equal-length images. Same numbers
as per-image attention (a test checks it).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings

import torch
import torch.nn.functional as F

NAME = "flash_packed_sdpa"


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query/key/value [1, heads, seq, dim] -> ([1, seq, heads, dim], None), images separated by cu_seq_lens_q."""
    seq = query.shape[2]
    cu = cu_seq_lens_q if cu_seq_lens_q is not None else torch.tensor([0, seq], device=query.device, dtype=torch.int32)
    return attend(query, key, value, cu, max_length_q, scaling), None


def attend(query, key, value, cu_seq_lens, longest=None, scaling=None, causal: bool = False) -> torch.Tensor:
    """Attention within each sequence of a pack: query [1, heads, T, dim], key/value [1, kv heads, T, dim] (fewer KV
    heads than query heads: grouped-query attention), sequence i at ``cu_seq_lens[i]:cu_seq_lens[i + 1]`` ->
    [1, T, heads, dim]. The tower's images attend both ways; RoT's packed teacher-forced rows (``rot_model.attention``)
    are ``causal``."""
    group = query.shape[1] // key.shape[1]
    if query.is_cuda and (not torch.is_grad_enabled() or varlen_trains()):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seq_lens.to(query.device, torch.int32)
        longest = int(longest) if longest is not None else int((cu[1:] - cu[:-1]).max())
        causal_keywords, takes_groups = varlen_keywords()
        if group > 1 and not takes_groups:  # this torch's kernel wants one K/V head per query head: expand them
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [T, heads, dim]
        extra = {**(causal_keywords if causal else {}), **({"enable_gqa": True} if takes_groups and group > 1 else {})}
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **extra).unsqueeze(0)
    # training (needs gradients) or no varlen kernel: one batched SDPA call per run of equal-length sequences
    # (a pack-wide block mask would grow with the square of the pack); packs sorted by length have few runs
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).tolist()
    outputs, start = [], 0
    for length, run in itertools.groupby(lengths):
        count = len(list(run))
        stop = start + count * length
        if length:
            q, k, v = (t[0, :, start:stop].unflatten(1, (count, length)).transpose(0, 1) for t in (query, key, value))
            output = F.scaled_dot_product_attention(q, k, v, scale=scaling, is_causal=causal, enable_gqa=group > 1)
            outputs.append(output.permute(0, 2, 1, 3).flatten(0, 1))  # [count * length, heads, dim]
        start = stop
    return torch.cat(outputs).unsqueeze(0)


@functools.lru_cache(maxsize=None)
def varlen_keywords() -> tuple[dict, bool]:
    """(the keywords that make this torch's ``varlen_attn`` causal, whether it takes fewer K/V heads than query heads):
    torch 2.10 takes ``is_causal``, later ones ``window_size=(-1, 0)``; ``enable_gqa`` came after ``window_size``."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    return causal, "enable_gqa" in parameters


@functools.lru_cache(maxsize=None)
def varlen_trains() -> bool:
    """Whether this torch's varlen kernel has a backward on this GPU (tried once on a tiny input).

    The first call comes from inside a layer's forward, which activation checkpointing may be recording: the probe
    keeps its own saved tensors (identity hooks), else the recomputed forward, where the answer is cached, would save
    fewer tensors than the first and checkpointing would refuse the backward."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            q = torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
            varlen_attn(q, q, q, cu, cu, 5, 5).sum().backward()
        return q.grad is not None
    except Exception as error:  # an older torch: no varlen module, or no backward registered
        warnings.warn(f"packed training passes use SDPA per run of equal lengths: this torch's varlen kernel did not "
                      f"train here ({type(error).__name__}: {error})", stacklevel=2)
        return False


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
