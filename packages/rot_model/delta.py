"""A fine-tuned language model stored as its difference from the base it started from, a few bits per weight.

Full fine-tuning exports every LLM weight (19 MB for the anchor's 6 layers), but what training changed is small next
to the weights themselves. Stored per output row as ``bits``-bit integers times one float scale, that difference
costs a quarter (8 bits) or an eighth (4 bits) of the bf16 weights: a shipped model stays small in every clone's
history, and an export fits beside the wheels in one GPU call. The file records the base by name and by the checksum
of its weights, so a delta is never added to weights it was not made from.
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


def quantize(delta: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row integers and their scales; 4-bit values are packed two to a byte (the row length made even)."""
    top = 2 ** (bits - 1) - 1
    delta = delta.float()
    scale = delta.abs().amax(dim=1) / top
    q = torch.round(delta / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp(-top, top).to(torch.int8)
    if bits == 4:
        q = torch.nn.functional.pad(q, (0, q.shape[1] % 2))
        q = ((q[:, 0::2] + 8) | ((q[:, 1::2] + 8) << 4)).to(torch.uint8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    if bits == 4:
        low, high = (q & 15).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=2).flatten(1)[:, :columns]
    return q.float() * scale[:, None]


def write(tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor], base_name: str, path: Path,
          bits: int) -> dict[str, int]:
    """Save ``tensors`` as differences from ``base`` (matrices of the same shape) or whole (everything else)."""
    if bits not in BITS:
        raise ValueError(f"--bits {bits}: use one of {', '.join(map(str, BITS))}")
    stored, counts = {}, {"quantized": 0, "whole": 0}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and name in base and base[name].shape == tensor.shape:
            stored[f"{name}.q"], stored[f"{name}.scale"] = quantize(tensor.float() - base[name].float(), bits)
            counts["quantized"] += tensor.numel()
        else:  # norms, and rows the base does not have: kept as they are
            stored[name] = tensor.contiguous()
            counts["whole"] += tensor.numel()
    metadata = {"format": FORMAT, "bits": str(bits), "base": base_name, "base_sha256": tensors_sha256(base)}
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
        bits, keys = int(metadata["bits"]), set(handle.keys())
        tensors = {}
        for key in keys:
            if key.endswith(".scale"):
                continue
            if key.endswith(".q"):
                name = key[:-2]
                reference = base[name]
                difference = dequantize(handle.get_tensor(key), handle.get_tensor(f"{name}.scale"), bits, reference.shape[1])
                tensors[name] = (reference.float() + difference).to(reference.dtype)
            else:
                tensors[key] = handle.get_tensor(key)
    return tensors
