"""Fused q/k/v and gate/up projections for inference: two matrix products per layer where the model runs five.

At batch 1 a decode step is bound by reading the weights: each is read once per step, and a product of one row
with a small matrix (k_proj, v_proj) reads its weight far below the memory bandwidth that a large one reaches.
Concatenating [q; k; v] and [gate; up] along the output dimension reads the same bytes in two large products in
place of five, two of them small. Each output element is still the dot product of the same input with the same
weight row, so the numbers do not change (only the reduction order may, if the larger product is tiled otherwise:
differences within the dtype's rounding).

No forward code is copied. ``fuse_projections`` changes each layer's attention and MLP in place:

* the fused ``nn.Linear`` (``qkv_proj``, ``gate_up_proj``) takes the place of the separate weights, which are
  freed (the fused weight is their only copy);
* ``q_proj``/``k_proj``/``v_proj`` (``gate_proj``/``up_proj``) become ``ProjectionSlice`` modules without
  weights, which return their columns of the fused product as a view (no copy, no state, no host sync);
* the module's class becomes a subclass of its own class whose ``forward`` applies the fused Linear to the input
  and calls the model's own ``forward`` with that product in place of the input. The model's forward then reads
  its projections off the product through the slices. This relies on the forward using its input only through
  the fused projections and through ``input.shape[:-1]`` (the attention's ``input_shape``), as the Qwen3 and
  Qwen3-VL attention and MLP forwards of transformers 5.17 to 5.24 do.

The model stays an instance of its classes (``isinstance`` checks, the output-recording hooks keyed on the
attention class) and keeps its module paths, parameter count, dtype and device. A fused model is for inference:
its state dict (``qkv_proj``, ``gate_up_proj``) does not load back into the unfused classes, and it does not pickle
as a whole (the subclasses are made at run time); it deep-copies. LoRA-wrapped or quantized projections are refused:
merge the adapters first. Fuse before decoding, compiling or capturing: fusing frees the separate weights, and
an engine made before it (``RoTModel.engines``, a ``StaticDecoder``) would replay CUDA graphs that read them: clear
the model's engines after fusing (``rot_eval.generate.load_for_inference`` fuses before any engine exists). ``rot_model.export.export`` refuses a fused model.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["FUSED_MODEL_TYPES", "FusedInput", "ProjectionSlice", "fuse_projections"]

# the text models whose attention and MLP forwards read their input only through these projections (and its shape):
# the backbones of the supported VLMs (rot_model.backbone.TEXT_ARCHITECTURE); tests/test_fused.py checks both
FUSED_MODEL_TYPES = ("qwen2", "qwen3")
ATTENTION = ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"))  # (layer attribute, fused name, its parts)
MLP = ("mlp", "gate_up_proj", ("gate_proj", "up_proj"))


class ProjectionSlice(nn.Module):
    """Stands in for one fused projection: its columns ``[start, stop)`` of the fused product, as a view."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return fused[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"columns {self.start}:{self.stop} of the fused product"


class FusedInput:
    """Mixin of the fused classes: the model's own forward, run on ``fused_name(input)`` in place of the input."""

    fused_name: str  # attribute of the fused nn.Linear
    input_name: str  # name of the original forward's first parameter (when it is passed by keyword)

    def forward(self, *args, **kwargs):
        project = getattr(self, self.fused_name)
        if args:
            args = (project(args[0]), *args[1:])
        else:
            kwargs = {**kwargs, self.input_name: project(kwargs[self.input_name])}
        return super().forward(*args, **kwargs)


_fused_classes: dict[tuple[type, str], type] = {}


def _fused_class(original: type, fused_name: str) -> type:
    """``Fused<Original>``: a subclass of ``original`` (made once per class) whose forward runs the fused product."""
    key = (original, fused_name)
    if key not in _fused_classes:
        first = list(inspect.signature(original.forward).parameters)[1]  # the input, after ``self``
        _fused_classes[key] = type(f"Fused{original.__name__}", (FusedInput, original),
                                   {"fused_name": fused_name, "input_name": first, "__module__": __name__})
    return _fused_classes[key]


def _parts(layer: nn.Module, index: int, spec) -> tuple[nn.Module, list[nn.Linear]] | None:
    """The module and its projections to fuse (None if this layer is fused already); ValueError if not fusable."""
    attribute, fused_name, names = spec
    module = getattr(layer, attribute, None)
    if module is None:
        raise ValueError(f"fuse_projections: layer {index} has no `{attribute}` module")
    if isinstance(module, FusedInput):
        return None
    parts = [getattr(module, name, None) for name in names]
    for name, part in zip(names, parts):
        if type(part) is not nn.Linear:  # exactly nn.Linear: LoRA wrappers and quantized subclasses are refused
            raise ValueError(f"fuse_projections: layer {index}'s {attribute}.{name} is "
                             f"{type(part).__name__}, not torch.nn.Linear (merge LoRA adapters first)")
    first = parts[0]
    if hasattr(module, fused_name) or any(
            part.in_features != first.in_features or part.weight.dtype != first.weight.dtype
            or part.weight.device != first.weight.device or (part.bias is None) != (first.bias is None)
            for part in parts):
        raise ValueError(f"fuse_projections: layer {index}'s {attribute} projections {'/'.join(names)} differ in "
                         f"input size, dtype, device or bias, or `{fused_name}` exists already")
    return module, parts


def _fuse(module: nn.Module, parts: list[nn.Linear], spec) -> None:
    _, fused_name, names = spec
    first = parts[0]
    with torch.no_grad():
        weight = torch.cat([part.weight for part in parts])
        bias = torch.cat([part.bias for part in parts]) if first.bias is not None else None
    fused = nn.Linear(first.in_features, weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=first.bias.requires_grad)
    start = 0
    for name, part in zip(names, parts):
        setattr(module, name, ProjectionSlice(start, start + part.out_features))  # drops the separate weight
        start += part.out_features
    setattr(module, fused_name, fused)
    module.__class__ = _fused_class(type(module), fused_name)


def fuse_projections(decoder: nn.Module) -> int:
    """Fuse q/k/v and gate/up of every layer of ``decoder`` (the module whose ``.layers`` are the decoder layers:
    ``Qwen3Model``, Qwen3-VL's ``model.language_model``) in place, for inference. Returns the number of layers fused
    (layers fused by an earlier call are skipped). Raises ValueError, before changing anything, if a layer lacks
    the expected modules."""
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, (nn.ModuleList, list, tuple)) or not len(layers):
        raise ValueError(f"fuse_projections: {type(decoder).__name__} has no `.layers` "
                         "(pass the decoder, e.g. model.model or model.model.language_model)")
    plan = [(_parts(layer, index, ATTENTION), _parts(layer, index, MLP)) for index, layer in enumerate(layers)]
    count = 0
    while plan:  # popped, so each layer's separate weights are freed once it is fused (not all at the end)
        attention, mlp = plan.pop(0)
        for found, spec in ((attention, ATTENTION), (mlp, MLP)):
            if found is not None:
                _fuse(*found, spec)
        count += attention is not None or mlp is not None
        del attention, mlp, found
    return count
