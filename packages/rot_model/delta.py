"""A fine-tuned language model stored as its difference from the base it started from, a few bits per weight.

Full fine-tuning exports every LLM weight (19 MB for the anchor's 6 layers), but what training changed is small next
to the weights themselves. Stored as ``bits``-bit integers times a scale, that difference costs about a quarter
(8 bits, one float scale per output row) or an eighth (4 bits, one bf16 scale per ``GROUP`` weights) of the bf16
weights: a shipped model stays small in every clone's history, and an export fits beside the wheels in one GPU call.
The file records the base by name and by the checksum of its weights, so a delta is never added to weights it was not
made from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rot_data.checksums import tensors_sha256

FILE = "delta.safetensors"  # in an export's model/ folder, in place of model.safetensors
FORMAT = "rot-delta/1"
BITS = (4, 8)
GROUP = 64  # weights per scale at 4 bits: one scale per row (1024 weights) took rot-5x5 from 99.9% to 97.7% on test


def quantize(delta: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integers and one scale per row of ``delta`` (a matrix's row, or a group of it: ``groups``), the scale
    stored as ``scale_dtype`` and rounded up so every integer stays in range and every weight within half a step;
    4-bit values are packed two to a byte (the row length made even)."""
    top = 2 ** (bits - 1) - 1
    delta = delta.float()
    exact = delta.abs().amax(dim=1) / top
    scale = exact.to(scale_dtype)
    scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    q = torch.round(delta / scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-top, top).to(torch.int8)
    if bits == 4:
        q = torch.nn.functional.pad(q, (0, q.shape[1] % 2))
        q = ((q[:, 0::2] + 8) | ((q[:, 1::2] + 8) << 4)).to(torch.uint8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    if bits == 4:
        low, high = (q & 15).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=2).flatten(1)[:, :columns]
    return q.float() * scale[:, None]


def groups(shape: torch.Size, group: int) -> int:
    """Weights per scale for a matrix of ``shape``: ``group`` where its rows divide into such groups, else a row."""
    return group if group and shape[1] % group == 0 else shape[1]


def write(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor], base_name: str, path: Path,
          bits: int) -> dict[str, int]:
    """Save ``tensors`` as differences from ``base`` (matrices of the same shape) or whole (everything else)."""
    if bits not in BITS:
        raise ValueError(f"--bits {bits}: use one of {', '.join(map(str, BITS))}")
    group = GROUP if bits == 4 else 0  # 0: a scale per row
    stored, counts = {}, {"quantized": 0, "whole": 0}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and name in base and base[name].shape == tensor.shape:
            difference = (tensor.float() - base[name].float()).reshape(-1, groups(tensor.shape, group))
            stored[f"{name}.q"], stored[f"{name}.scale"] = quantize(difference, bits, torch.bfloat16 if group else torch.float32)
            counts["quantized"] += tensor.numel()
        else:  # norms, and rows the base does not have: kept as they are
            stored[name] = tensor.contiguous()
            counts["whole"] += tensor.numel()
    metadata = {"format": FORMAT, "bits": str(bits), "group": str(group), "base": base_name,
                "base_sha256": tensors_sha256(base)}
    save_file(stored, str(path), metadata=metadata)
    return counts


def base_name(path: Path) -> str:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["base"]


def add(path: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fine-tuned tensors: ``base`` plus the stored differences (after checking it is the base they came from)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        if tensors_sha256(base) != metadata["base_sha256"]:
            raise ValueError(f"{path} is a difference from the weights of '{metadata['base']}' (sha256 "
                             f"{metadata['base_sha256'][:12]}), and the '{metadata['base']}' found here has other "
                             "weights (another version?): install the version it was made with, or use an export "
                             "with whole weights")
        bits, group, keys = int(metadata["bits"]), int(metadata.get("group", 0)), set(handle.keys())
        tensors = {}
        for key in keys:
            if key.endswith(".scale"):
                continue
            if key.endswith(".q"):
                name = key[:-2]
                reference = base[name]
                scale = handle.get_tensor(f"{name}.scale").float()
                difference = dequantize(handle.get_tensor(key), scale, bits, groups(reference.shape, group))
                tensors[name] = (reference.float() + difference.reshape(reference.shape)).to(reference.dtype)
            else:
                tensors[key] = handle.get_tensor(key)
    return tensors
