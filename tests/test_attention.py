"""The backbone's attention (rot_model.attention): transformers' SDPA numbers, without copying the grouped KV cache
in a decode step. The shipped anchor has 6 query heads over 2 key/value heads: groups of 3."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rot_model import attention
from rot_model.backbone import load_backbone
from rot_model.decoding import StaticDecoder


class QueryShapes(TorchFunctionMode):
    """Records the query shape of every scaled_dot_product_attention call made inside it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def anchor_pair():
    """The anchor's language model with this project's attention, and a copy on transformers' own SDPA."""
    model, _ = load_backbone("anchor", dtype=torch.float32)
    assert model.config._attn_implementation == attention.NAME
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "sdpa"
    return model.eval(), reference.eval()


def decode(model, prompt, mask, steps):
    engine = StaticDecoder(model.model, prompt.shape[0], 40)
    with torch.no_grad():
        return [engine.prefill(prompt, mask)] + [engine.step(inputs) for inputs in steps]


def test_decode_steps_match_transformers_sdpa_and_skip_the_grouped_copy():
    model, reference = anchor_pair()
    generator = torch.Generator().manual_seed(0)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        prompt = embed(torch.randint(0, 200, (3, 16), generator=generator))
        steps = [torch.randn(3, model.config.hidden_size, generator=generator) for _ in range(5)]
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :6], mask[2, :11] = 0, 0  # left padding of different lengths: the mask matters
    with QueryShapes() as seen:
        ours = decode(model, prompt, mask, steps)
    theirs = decode(reference, prompt, mask, steps)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    layers, heads, kv_heads = model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads
    # the prefill as transformers runs it (all query heads), then every step with the query heads grouped per kv head
    assert seen.shapes[:layers] == [(3, heads, 16, model.config.head_dim)] * layers
    assert seen.shapes[layers:] == [(3, kv_heads, heads // kv_heads, model.config.head_dim)] * (5 * layers)


def test_teacher_forced_pass_keeps_its_padding_mask_and_gradients():
    """A 2-D padding mask still reaches the attention (transformers drops masks of attention names it has no mask
    function for): logits and gradients equal SDPA's, and the padding changes them."""
    model, reference = anchor_pair()
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    outputs = []
    for m in (model, reference):
        logits = m(input_ids=ids, attention_mask=mask).logits
        logits[:, -1].logsumexp(-1).sum().backward()
        outputs.append((logits.detach(), m.model.layers[0].self_attn.k_proj.weight.grad))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
    assert (unmasked[1, -1] - outputs[0][0][1, -1]).abs().max() > 1e-3


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """[T, T]: position i sees j when both are in the same sequence and j <= i."""
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return (sequence[:, None] == sequence[None]) & torch.ones(len(sequence), len(sequence), dtype=torch.bool).tril()


def test_packed_attention_equals_sdpa_with_the_block_causal_mask():
    """Sequences of equal and different lengths, 6 query heads over 2 key/value heads, through the attention function
    as transformers calls it (cu_seq_lens_q among its keywords)."""
    lengths = [3, 5, 5, 2, 7]
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 6, sum(lengths), 16, generator=generator)
    key, value = (torch.randn(1, 2, sum(lengths), 16, generator=generator) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    module = torch.nn.Module()
    module.num_key_value_groups = 3
    ours, _ = attention.attention(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=7)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=block_causal_mask(lengths), scale=0.3,
                                              enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernel runs on a GPU only")
def test_packed_attention_on_the_gpu_equals_sdpa_with_the_block_causal_mask_and_so_do_its_gradients():
    """The CUDA path (torch's varlen_attn, grouped K/V handed over or expanded as this torch's kernel takes them), bf16,
    against SDPA with the block-causal mask, outputs and gradients."""
    lengths = [37, 64, 64, 5, 120]
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"query": (1, 32, sum(lengths), 128), "key": (1, 8, sum(lengths), 128), "value": (1, 8, sum(lengths), 128)}
    inputs = {name: torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
              for name, shape in shapes.items()}
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ours = attention.packed(*inputs.values(), cu, max(lengths), 128 ** -0.5)
    mask = block_causal_mask(lengths).cuda()
    expected = F.scaled_dot_product_attention(*inputs.values(), attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-2)
    upstream = torch.randn(ours.shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    for a, b in zip(torch.autograd.grad(ours, list(inputs.values()), upstream),
                    torch.autograd.grad(expected, list(inputs.values()), upstream)):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen kernel runs on a GPU only")
def test_the_first_packed_call_can_run_under_activation_checkpointing():
    """The first packed call asks once whether the varlen kernel trains (a probe with its own backward); under
    activation checkpointing that first call is recorded and recomputed, so the probe must save nothing into the
    checkpoint (on the GPU it once failed: 'A different number of tensors was saved')."""
    import torch.utils.checkpoint

    from rot_vision.packed_attention import varlen_trains

    varlen_trains.cache_clear()
    lengths = [5, 11]
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device="cuda")
    query = torch.randn(1, 4, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    key, value = (torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    run = lambda q: attention.packed(q, key, value, cu, max(lengths), 0.125).float().square().sum()  # noqa: E731
    torch.utils.checkpoint.checkpoint(run, query, use_reentrant=False).backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


class SquareTensors(TorchFunctionMode):
    """Records whether any torch call inside it returned a tensor whose last two sizes are both ``size``."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.seen = size, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.dim() >= 2 and tuple(result.shape[-2:]) == (self.size, self.size):
            self.seen = True
        return result


def test_a_packed_call_hands_transformers_no_square_mask():
    """With ``no_mask`` the packed call (no cache, as ``RoTModel.decode`` makes it) builds no [T, T] mask; without it
    transformers detects the packing from the restarting positions and builds one (so the check can see a mask)."""
    model, _ = anchor_pair()
    lengths = [4, 9, 6]
    total = sum(lengths)
    inputs = torch.randn(1, total, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 4, 13, 19], dtype=torch.int32)
    packed = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 9, "max_length_k": 9, "use_cache": False}
    with torch.no_grad():
        with SquareTensors(total) as without:
            model.model(inputs_embeds=inputs, position_ids=positions, **packed)
        with SquareTensors(total) as with_no_mask:
            hidden = model.model(inputs_embeds=inputs, attention_mask=attention.no_mask(model.config),
                                 position_ids=positions, **packed).last_hidden_state
        # each sequence alone, unpacked, gives the same hidden states
        alone = [model.model(inputs_embeds=part).last_hidden_state for part in inputs.split(lengths, dim=1)]
    assert without.seen and not with_no_mask.seen
    torch.testing.assert_close(hidden, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
