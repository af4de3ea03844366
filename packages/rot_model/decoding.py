"""The decoding engine: one static KV cache sized for the whole answer, updated in place.

A Hugging Face dynamic cache grows by one position per step, and the attention mask with it, so every decode step
has new shapes and allocates. Here the cache (``transformers.StaticCache``), the attention mask, the positions and
the write index are allocated once for prefix + latents + answer and changed in place: every step after the prefill
runs the same kernels on the same buffers, so on a GPU the step is captured once as a CUDA graph and replayed: one
launch per step instead of hundreds of small kernels launched from Python. The prefill is captured the same way,
once per prompt length. Attention masks are passed as 4-D tensors, which Hugging Face models take as they are, so
nothing reads a device value on the host during capture. RoT's latents and the text baselines' tokens go through
the same ``step``, so their speeds compare latents with tokens, not one engine with another. Prompts are left-padded
up to a multiple of ``PREFILL_BUCKET`` so that a few prefill shapes serve every batch. It lives in ``rot_model``
because the trainer rolls its latents out on it too (``RoTModel.rollout_hidden``); ``rot_eval`` decodes with it. Each
model keeps its own engines (``Engines``, ``RoTModel.engines``): no state is shared between models or set from outside.
"""

from __future__ import annotations

import warnings

import torch

from rot_data.transformers_compat import cache_arg

PREFILL_BUCKET = 16  # prompts are left-padded to a multiple of this: few distinct prefill shapes


def bucketed(ids: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (ids, mask) to the next multiple of PREFILL_BUCKET columns (padding is masked: outputs unchanged)."""
    extra = -ids.shape[1] % PREFILL_BUCKET
    if not extra:
        return ids, mask
    return (torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1),
            torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1))


class Engines:
    """The engines one model keeps for reuse by later calls of the same shape (an evaluation's batches, the trainer's
    rollouts, a benchmark's repeats), so a cache is allocated and a step captured once per shape.

    ``graphs``: capture each prefill and step as a CUDA graph and replay it (GPU only; None: wherever the weights are
    on a GPU). Off where weights do not stay in place (ZeRO-3 gathers them into new buffers at every call).
    ``compile_step``: torch.compile the step before capturing it (fuses its small kernels: 1.7x faster for the 4B
    shape on an H100, but 55-75 s of compilation per engine shape, so only benchmarks turn it on).
    The key holds the address of every weight: a model loaded or moved elsewhere, or any one weight given new
    storage (DeepSpeed's ZeRO-2 gathers the trainable ones, e.g. Stage II's LoRA matrices, into one flat buffer after
    the trainer's memory probe has rolled out; fusing projections, ``rot_model.fused``), gets a new engine, never one
    whose graphs read freed memory."""

    def __init__(self, graphs: bool | None = None, compile_step: bool = False, keep: int = 2):
        self.graphs, self.compile_step, self.keep = graphs, compile_step, keep
        self.kept: dict = {}

    def get(self, decoder, rows: int, max_len: int) -> "StaticDecoder":
        weight = next(decoder.parameters())
        graphs = weight.is_cuda if self.graphs is None else self.graphs and weight.is_cuda
        addresses = tuple(p.data_ptr() for p in decoder.parameters())
        key = (id(decoder), rows, max_len, addresses, graphs, self.compile_step)
        if key not in self.kept:
            self.kept[key] = StaticDecoder(decoder, rows, max_len, graphs=graphs, compile_step=self.compile_step)
            while len(self.kept) > self.keep:
                self.kept.pop(next(iter(self.kept)))
        return self.kept[key]

    def clear(self) -> None:
        self.kept.clear()


class StaticDecoder:
    """Decode ``rows`` sequences of at most ``max_len`` positions with one static KV cache.

    ``prefill(inputs, mask)`` runs the left-padded prompt and returns each row's last hidden state; each
    ``step(inputs)`` appends one input embedding per row and returns the new hidden states [rows, d]. On a GPU both
    are captured as CUDA graphs on their first call (the prefill once per prompt length) and replayed after: an eager
    prefill of a 4B model at batch 1 is launch bound (66 ms on an H100, where 39 decode steps take 324 ms).
    """

    def __init__(self, decoder, rows: int, max_len: int, graphs: bool | None = None, compile_step: bool = False):
        from transformers import StaticCache

        weight = next(decoder.parameters())
        self.decoder, self.max_len = decoder, max_len
        self.cache = StaticCache(config=decoder.config, max_cache_len=max_len)
        self.cache_kwargs = cache_arg(decoder, self.cache)  # the cache under the keyword this transformers expects
        self.mask = torch.zeros(rows, max_len, dtype=torch.long, device=weight.device)
        self.slots = torch.arange(max_len, device=weight.device)
        self.position = torch.zeros(rows, dtype=torch.long, device=weight.device)  # each row's last position id
        self.write_at = torch.zeros(1, dtype=torch.long, device=weight.device)  # the cache slot the next step fills
        # capture the prefill and the step as CUDA graphs (GPU only; None: wherever the weights are on a GPU)
        self.graphs = weight.is_cuda and (graphs is None or graphs)
        self.captured: dict = {}  # "step" or ("prefill", length) -> (graph, its input buffers, its output buffer)
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None  # one memory pool: they never run at once
        # compiled on its first (warm-up) call, then captured like the eager one
        self.step_function = torch.compile(self._step, dynamic=False) if compile_step and self.graphs else self._step

    def prefill(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        if length >= self.max_len:
            raise ValueError(f"a prompt of {length} positions does not fit a cache of {self.max_len}")
        return self._run(("prefill", length), self._prefill, inputs, mask)

    def step(self, inputs: torch.Tensor) -> torch.Tensor:
        """One position for every row: ``inputs`` [rows, d] -> hidden states [rows, d] (on the device; no host sync)."""
        return self._run("step", self.step_function, inputs)

    def _prefill(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        self.cache.reset()  # a reused engine: the cache counts its own write position from zero again
        self.mask.zero_()
        self.mask[:, :length] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        # [rows, 1, length, max_len]: causal over the prompt's real positions; a padding position sees itself only, so
        # no query row is fully masked (softmax over nothing gives NaN, and its cached values are read as 0 x NaN)
        causal = self.slots[None, :] <= self.slots[:length, None]
        visible = (self.mask.bool()[:, None, None, :] & causal) | (self.slots[None, :] == self.slots[:length, None])
        output = self.decoder(inputs_embeds=inputs, attention_mask=visible, position_ids=positions,
                              cache_position=self.slots[:length], use_cache=True, **self.cache_kwargs)
        self.position.copy_(positions[:, -1])
        self.write_at.fill_(length)
        return output.last_hidden_state[:, -1]

    def _step(self, inputs: torch.Tensor) -> torch.Tensor:
        self.mask.index_fill_(1, self.write_at, 1)
        self.position.add_(1)
        visible = self.mask.bool()[:, None, None, :]  # [rows, 1, query 1, max_len]: the slots written so far
        output = self.decoder(inputs_embeds=inputs[:, None], attention_mask=visible, position_ids=self.position[:, None],
                              cache_position=self.write_at, use_cache=True, **self.cache_kwargs)
        self.write_at.add_(1)
        return output.last_hidden_state[:, -1]

    def _run(self, key, function, *inputs: torch.Tensor) -> torch.Tensor:
        """``function(*inputs)``: eagerly on a CPU; on a GPU replayed from its graph, or, on the first call of ``key``,
        run eagerly on a side stream (the warm-up a capture requires) and then recorded (recording runs nothing: the
        state is untouched)."""
        if key in self.captured:
            graph, buffers, output = self.captured[key]
            for buffer, value in zip(buffers, inputs):
                buffer.copy_(value)
            graph.replay()
            return output.clone()
        if not self.graphs:
            return function(*inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = function(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        buffers = [value.clone() for value in inputs]
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = function(*buffers)
            self.captured[key] = graph, buffers, output
        except Exception as error:  # capture is best effort: the eager call gives the same numbers
            warnings.warn(f"decode {key[0] if isinstance(key, tuple) else key} not captured as a CUDA graph "
                          f"({type(error).__name__}: {error}); running it eagerly")
            self.graphs = False
            torch.cuda.synchronize()
        return result
