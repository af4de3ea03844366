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

import torch
import torch.nn.functional as F

NAME = "flash_packed_sdpa"


def packed_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query/key/value [1, heads, seq, dim] -> ([1, seq, heads, dim], None), images separated by cu_seq_lens_q."""
    seq = query.shape[2]
    cu = cu_seq_lens_q if cu_seq_lens_q is not None else torch.tensor([0, seq], device=query.device, dtype=torch.int32)
    if query.is_cuda and (not torch.is_grad_enabled() or varlen_trains()):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # [seq, heads, dim]
        cu = cu.to(query.device, torch.int32)
        longest = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        output = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling)
        return output.unsqueeze(0), None
    # training (needs gradients) or no varlen kernel: one batched SDPA call per run of equal-length images
    # (a pack-wide block mask would grow with the square of the pack); packs sorted by width have few runs
    lengths = (cu[1:] - cu[:-1]).tolist()
    outputs, start, index = [], 0, 0
    while index < len(lengths):
        run = 1
        while index + run < len(lengths) and lengths[index + run] == lengths[index]:
            run += 1
        stop = start + run * lengths[index]
        q, k, v = (t[0, :, start:stop].unflatten(1, (run, lengths[index])).transpose(0, 1) for t in (query, key, value))
        outputs.append(F.scaled_dot_product_attention(q, k, v, scale=scaling).transpose(0, 1).flatten(1, 2))
        start, index = stop, index + run
    return torch.cat(outputs, dim=1).transpose(0, 1).unsqueeze(0), None


@functools.lru_cache(maxsize=None)
def varlen_trains() -> bool:
    """Whether this torch's varlen kernel has a backward on this GPU (tried once on a tiny input)."""
    try:
        from torch.nn.attention.varlen import varlen_attn

        q = torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
        varlen_attn(q, q, q, cu, cu, 5, 5).sum().backward()
        return q.grad is not None
    except Exception:  # an older torch: no varlen module, or no backward registered
        return False


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_attention)
    return NAME
