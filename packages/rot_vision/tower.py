"""The frozen vision tower of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint, and nothing else.

Only the tower's tensors are read from the checkpoint's safetensors files (the language model is
never loaded). Images are patchified here, with the processor's normalisation constants, rather
than by the Hugging Face processor, whose ``smart_resize`` would rescale a thin one-line image;
many images are packed into one forward call (concatenated patches plus one ``grid_thw`` row per
image) and the post-merger output is split back per image.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rot_data import registry
from rot_data import hub
from rot_data.checksums import tensors_sha256
from rot_data.transformers_compat import merged_visual_tokens, tower_reads_grid_on_host
from rot_vision.packed_attention import NAME as PACKED, register as register_packed_attention

TINY = "tiny"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN, HALF_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
VISION_PREFIXES = ("model.visual.", "visual.")


TOWER_CLASSES = {  # model type -> (transformers module, class) of its vision tower
    "qwen2_vl": ("qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    "qwen2_5_vl": ("qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
    "qwen3_vl": ("qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel"),
}


def _check_model_type(model_type: str) -> None:
    if model_type not in TOWER_CLASSES:
        raise ValueError(f"--encoder: model type '{model_type}' is not supported; use a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint")


def _tower_class(model_type: str):
    """The tower's class, its module imported only now (a modeling module takes seconds to import: the build's driver,
    which never builds a tower, does not pay for it, and an encoder actor pays for one module, not three)."""
    _check_model_type(model_type)
    module, name = TOWER_CLASSES[model_type]
    return getattr(importlib.import_module(f"transformers.models.{module}"), name)


def tiny_vision_config():
    """A small Qwen3-VL-architecture tower (untrained) for offline smoke runs and tests."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    return Qwen3VLVisionConfig(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=256, deepstack_visual_indexes=[],
    )


def use_linear_patch_embedding(patch_embed) -> None:
    """Run the patch embedding (a Conv3d whose kernel equals its stride) as the matrix product it is.

    Each output sees exactly one flattened patch, so the convolution is ``x @ W.view(d, -1).T + b``;
    cuDNN has no good kernel for this shape in bf16 and can be many times slower than the GEMM
    (transformers issue #45750). Same weights, same numbers up to summation order (a test checks)."""
    proj = patch_embed.proj
    if tuple(proj.kernel_size) != tuple(proj.stride) or any(proj.padding) or proj.groups != 1:
        return

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = proj.weight.view(proj.out_channels, -1)
        return F.linear(hidden_states.to(weight.dtype).view(-1, weight.shape[1]), weight, proj.bias)

    patch_embed.forward = forward


def grid_thw_for(tower, grids, device) -> torch.Tensor:
    """The ``grid_thw`` tensor that makes the tower compute exactly the per-image result, fast.

    - Consecutive images of one size become one entry of t frames: the tower attends within each frame
      and gives every frame the same positions, so this is the same computation, while transformers'
      per-entry Python work (position ids, interpolation, rotary tables: ~80 small ops an entry) runs once
      per size instead of once per image (a test checks the outputs are equal).
    - On the CPU for a tower that reads it element by element in Python (``tower_reads_grid_on_host``), else on the
      device."""
    merged: list[list[int]] = []
    for t, h, w in (grids.tolist() if torch.is_tensor(grids) else grids):
        if merged and merged[-1][1:] == [h, w]:
            merged[-1][0] += t
        else:
            merged.append([t, h, w])
    on_host = tower_reads_grid_on_host(tower)
    return torch.tensor(merged, dtype=torch.long, device="cpu" if on_host else device)


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of the tower's tensors (names and bytes), so a shard set names the exact weights."""
    return tensors_sha256(state_dict)


@dataclass
class EncoderSource:
    """What the checkpoint says about its tower, read without building it."""

    name: str
    model_type: str
    vision_config: object
    state_dict: dict[str, torch.Tensor]
    revision: str | None
    image_mean: tuple
    image_std: tuple

    @property
    def untrained(self) -> bool:
        return self.name == TINY

    @cached_property
    def weights_sha256(self) -> str:
        return weights_sha256(self.state_dict)

    @property
    def token_px(self) -> int:
        return self.vision_config.patch_size * self.vision_config.spatial_merge_size

    @property
    def dim(self) -> int:
        return getattr(self.vision_config, "out_hidden_size", None) or self.vision_config.hidden_size

    def describe(self, attn_implementation: str, compute_dtype: str, cpu_threads: int | None = None) -> dict:
        """What the shard manifest records about the encoder (never mix shards that differ here): on a CPU the torch
        thread count too, since the float results depend on it."""
        return {
            "name": self.name, "model_type": self.model_type, "revision": self.revision,
            "weights_sha256": self.weights_sha256, "untrained": self.untrained,
            "attn_implementation": attn_implementation, "compute_dtype": compute_dtype,
            "patch_size": self.vision_config.patch_size, "merge_size": self.vision_config.spatial_merge_size,
            "token_px": self.token_px, "dim": self.dim, "patch_embedding": "linear",
        } | ({"cpu_threads": cpu_threads} if cpu_threads else {})


@dataclass(frozen=True)
class Patchifier:
    """Grey one-line images -> the tower's pixel values, as the HF processor would make them but without resizing.

    Shared by the build's encoder and the anchor's pretraining, so both see exactly the same patches."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    image_mean: tuple
    image_std: tuple

    @classmethod
    def for_source(cls, source: "EncoderSource") -> "Patchifier":
        config = source.vision_config
        return cls(config.patch_size, config.spatial_merge_size, config.temporal_patch_size,
                   tuple(source.image_mean), tuple(source.image_std))

    def grey_patches(self, grey: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """A [H, W] uint8 grey image -> (uint8 patches [h*w, p*p], grid (1, h, w)) in the processor's patch order.

        Kept as one byte per pixel: the 3 colour channels and the temporal repeat are added on the
        device, so the host does a cheap uint8 reshuffle and sends 6x4 times fewer bytes."""
        height, width = grey.shape
        p, m = self.patch_size, self.merge_size
        if height % (p * m) or width % (p * m):
            raise ValueError(f"image {height}x{width} is not a whole number of {p * m}px tokens; render it with this encoder's token size")
        grid_h, grid_w = height // p, width // p
        blocks = grey.reshape(grid_h // m, m, p, grid_w // m, m, p).transpose(0, 3, 1, 4, 2, 5)
        return blocks.reshape(grid_h * grid_w, p * p), (1, grid_h, grid_w)

    def normalise(self, grey_patches: torch.Tensor) -> torch.Tensor:
        """uint8 [n, p*p] -> float32 [n, 3*t*p*p] (channel, time, y, x): the processor's pixel values."""
        t = self.temporal_patch_size
        pixels = grey_patches.float().div_(255.0)[:, None, None, :]
        mean = torch.tensor(self.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=pixels.device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).expand(-1, 3, t, -1).reshape(len(grey_patches), -1)


# Qwen3-VL's patches (the anchor's): 16 px, 2x2 merge, 2 frames, mean and std 0.5. The anchor's pretraining and the
# reader (rot_vision.read) patchify with it, so both see exactly the patches the build's encoder makes.
QWEN3_VL_PATCHIFIER = Patchifier(16, 2, 2, HALF_MEAN, HALF_STD)


def _checkpoint_dir(name: str) -> Path:
    """A local folder, or the hub snapshot holding config, processor config and safetensors index."""
    return hub.snapshot(name, "--encoder", ["*.json"])


def _vision_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """Read only the tower's tensors, opening only the safetensors files that hold them."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({f for key, f in weight_map.items() if key.startswith(VISION_PREFIXES)})
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file_name in files:
        path = folder / file_name
        if not path.exists():
            if Path(name).is_dir():
                raise ValueError(f"--encoder {name}: {file_name} is missing from the folder; copy the whole checkpoint")
            path = hub.file_of(name, file_name, "--encoder")
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                for prefix in VISION_PREFIXES:
                    if key.startswith(prefix):
                        tensors[key[len(prefix):]] = handle.get_tensor(key)
    if not tensors:
        raise ValueError(f"--encoder {name}: no vision-tower tensors (prefix model.visual. or visual.) in its safetensors files")
    return tensors


def read_encoder_source(name: str) -> EncoderSource:
    """The tower of ``name``: 'tiny' (built here), 'anchor' (the shipped pretrained VLM), a hub id or a folder."""
    if name == TINY:
        config = tiny_vision_config()
        torch.manual_seed(0)
        state_dict = _tower_class("qwen3_vl")._from_config(config).state_dict()
        return EncoderSource(TINY, "qwen3_vl", config, state_dict, None, HALF_MEAN, HALF_STD)
    from transformers import AutoConfig

    folder = _checkpoint_dir(registry.resolve(name))
    config = AutoConfig.from_pretrained(str(folder))
    model_type = config.model_type
    _check_model_type(model_type)
    mean, std = (HALF_MEAN, HALF_STD) if model_type == "qwen3_vl" else (CLIP_MEAN, CLIP_STD)
    processor_file = folder / "preprocessor_config.json"
    if processor_file.exists():
        processor = json.loads(processor_file.read_text())
        mean, std = tuple(processor.get("image_mean", mean)), tuple(processor.get("image_std", std))
    revision = folder.name if "snapshots" in folder.parts else None
    return EncoderSource(name, model_type, config.vision_config, _vision_tensors(folder, name), revision, mean, std)


class VisionEncoder:
    """Frozen tower + patchify + packed forward. ``encode(images)`` -> one [n_tokens, d] per image."""

    def __init__(self, source: EncoderSource, device: str = "cpu", dtype: torch.dtype | None = None,
                 attn_implementation: str = "sdpa"):
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        config = source.vision_config
        tower_class = _tower_class(source.model_type)
        with torch.device(self.device):
            tower = tower_class._from_config(config, attn_implementation="sdpa" if attn_implementation == PACKED else attn_implementation)
        if attn_implementation == PACKED:  # set after construction: transformers would look for a flash-attn kernel
            register_packed_attention()
            tower.config._attn_implementation_internal = PACKED
        tower.load_state_dict(source.state_dict, strict=True)
        use_linear_patch_embedding(tower.patch_embed)
        self.tower = tower.to(self.dtype).eval().requires_grad_(False)
        self.patchifier = Patchifier.for_source(source)
        self.merge_size = config.spatial_merge_size
        self.token_px = source.token_px
        self.dim = source.dim
        self.attn_implementation = attn_implementation
        if self.device.type == "cpu":
            # warm-up: in a fresh process with several torch threads, the first call of a vector-math function (the
            # rotary embedding's cos) was sometimes slightly off on one thread's half of its output (seen in 8 of 40
            # loaded processes; a first-call race in the CPU math library, inferred), so the first real pack would
            # differ from a resumed build's by a bf16 step. Each function once on an input large enough to be split
            # over every thread, then one throwaway encode for the rest of the tower's first calls
            values = torch.linspace(-1, 1, 1 << 20)
            for function in (torch.cos, torch.sin, torch.exp, torch.tanh, torch.erf, torch.sigmoid):
                function(values)
            self.encode_packed([np.zeros((self.token_px, 4 * self.token_px), np.uint8)])

    @classmethod
    def from_pretrained(cls, name: str, device: str = "cpu", dtype: torch.dtype | None = None,
                        attn_implementation: str = "sdpa") -> "VisionEncoder":
        return cls(read_encoder_source(name), device, dtype, attn_implementation)

    def grey_patches(self, grey: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        return self.patchifier.grey_patches(grey)

    def normalise(self, grey_patches: torch.Tensor) -> torch.Tensor:
        return self.patchifier.normalise(grey_patches)

    def patchify(self, grey: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A [H, W] uint8 grey image -> (pixel values [h*w, C*T*p*p], grid (1, h, w)), as the HF processor gives them."""
        patches, grid = self.grey_patches(grey)
        return self.normalise(torch.from_numpy(np.ascontiguousarray(patches))), grid

    @torch.no_grad()
    def encode_packed(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[int]]:
        """Encode many images in one forward call: (post-merger tokens of all images [sum n_i, d], n_i per image).

        The pack is ordered by width inside the call (equal widths become one multi-frame entry, see
        ``grid_thw_for``) and the result is put back in the order given."""
        order = sorted(range(len(images)), key=lambda i: images[i].shape[1])
        patches, grids = zip(*(self.grey_patches(images[i]) for i in order))
        grey = torch.from_numpy(np.concatenate(patches))
        if self.device.type == "cuda":
            grey = grey.pin_memory()
        pixel_values = self.normalise(grey.to(self.device, non_blocking=True)).to(self.dtype)
        output = self.tower(pixel_values, grid_thw=grid_thw_for(self.tower, grids, self.device))
        merged = merged_visual_tokens(output)
        sizes = [t * h * w // self.merge_size**2 for t, h, w in grids]
        pieces = dict(zip(order, merged.split(sizes)))
        if order != sorted(order):
            merged = torch.cat([pieces[i] for i in range(len(images))])
        return merged, [len(pieces[i]) for i in range(len(images))]

    def encode(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Encode many images in one packed forward call; returns post-merger [n_tokens, d] per image."""
        merged, tokens_per_image = self.encode_packed(images)
        return list(merged.split(tokens_per_image))
