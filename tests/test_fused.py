"""Fused q/k/v and gate/up projections (rot_model.fused) compute what the unfused model computes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rot_data.transformers_compat import cache_arg, output_cache
from rot_model.fused import fuse_projections


def tiny_qwen3(attn_implementation: str = "sdpa", dtype=torch.float32, architecture: str = "qwen3"):
    """A tiny random Qwen3 (or Qwen2, the text model of Qwen2/2.5-VL: biases on q/k/v)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)
    config = Qwen3Config(head_dim=16, **kwargs) if architecture == "qwen3" else Qwen2Config(**kwargs)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def tiny_qwen3_vl_decoder():
    """The language model of a tiny random Qwen3-VL (as the project builds them)."""
    from transformers import Qwen3VLForConditionalGeneration

    from rot_fixtures.tiny import tiny_vlm_config

    torch.manual_seed(0)
    return Qwen3VLForConditionalGeneration(tiny_vlm_config("qwen3_vl")).eval().model.language_model


def fused_copy(model, decoder_of=lambda model: model.model):
    fused = copy.deepcopy(model)
    assert fuse_projections(decoder_of(fused)) == len(decoder_of(fused).layers)
    return fused


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_implementation,architecture", [("sdpa", "qwen3"), ("eager", "qwen3"), ("sdpa", "qwen2")])
def test_fused_logits_and_cached_decode_match(attn_implementation, architecture):
    model = tiny_qwen3(attn_implementation, architecture=architecture)
    fused = fused_copy(model)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(fused(ids).logits, model(ids).logits)
        # prefill with a cache, then two decode steps fed from it
        outputs = [m(ids, use_cache=True) for m in (model, fused)]
        for step in range(2):
            close(outputs[1].logits, outputs[0].logits)
            token = outputs[0].logits[:, -1:].argmax(-1)
            outputs = [m(token, use_cache=True, **cache_arg(m, output_cache(out))) for m, out in zip((model, fused), outputs)]
        close(outputs[1].logits, outputs[0].logits)


def test_fused_weights_replace_the_separate_ones():
    model = tiny_qwen3(dtype=torch.bfloat16)
    fused = fused_copy(model)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    modules = {part for name, _ in fused.named_parameters() for part in name.split(".")}
    assert modules.isdisjoint({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}) and "qkv_proj" in modules
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in fused.parameters())
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    fused_attention, fused_mlp = fused.model.layers[1].self_attn, fused.model.layers[1].mlp
    assert torch.equal(fused_attention.qkv_proj.weight,
                       torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
    assert torch.equal(fused_mlp.gate_up_proj.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert isinstance(fused_attention, type(attention)) and isinstance(fused_mlp, type(mlp))
    assert fuse_projections(fused.model) == 0  # already fused: nothing to do


def test_fused_decoder_compiles_without_graph_breaks():
    model = tiny_qwen3()
    fused = fused_copy(model)
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    compiled = torch.compile(fused.model, backend="eager", fullgraph=True)
    with torch.no_grad():
        close(compiled(ids, use_cache=False).last_hidden_state, model.model(ids, use_cache=False).last_hidden_state)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["qwen3", "qwen3_vl"])
def test_fused_decoder_matches_in_the_static_decoding_engine(family):
    from rot_model.decoding import StaticDecoder

    decoder = tiny_qwen3().model if family == "qwen3" else tiny_qwen3_vl_decoder()
    fused = copy.deepcopy(decoder)
    assert fuse_projections(fused) == len(fused.layers)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        prompt = decoder.embed_tokens(torch.randint(0, 100, (1, 16), generator=generator))
        mask = torch.ones(1, 16, dtype=torch.long)
        mask[:, :5] = 0  # left padding: the engine's 4-D masks hide it
        steps = [decoder.embed_tokens(torch.randint(0, 100, (1,), generator=generator)) for _ in range(3)]
        hidden = []
        for module in (decoder, fused):
            engine = StaticDecoder(module, 1, 32)
            hidden.append([engine.prefill(prompt, mask)] + [engine.step(inputs) for inputs in steps])
    for fused_state, state in zip(hidden[1], hidden[0]):
        close(fused_state, state)


def test_fused_qwen3_vl_language_model_matches():
    decoder = tiny_qwen3_vl_decoder()
    fused = copy.deepcopy(decoder)
    assert fuse_projections(fused) == 2
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        close(fused(input_ids=ids, use_cache=False).last_hidden_state,
              decoder(input_ids=ids, use_cache=False).last_hidden_state)


def test_refuses_modules_it_cannot_fuse():
    with pytest.raises(ValueError, match=r"Linear has no `\.layers`"):
        fuse_projections(nn.Linear(4, 4))
    model = tiny_qwen3()
    model.model.layers[1].self_attn.k_proj = nn.Sequential(model.model.layers[1].self_attn.k_proj)  # like a wrapper
    with pytest.raises(ValueError, match=r"layer 1's self_attn.k_proj is Sequential, not torch.nn.Linear"):
        fuse_projections(model.model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # refused before changing anything
    model.model.layers[1].self_attn.k_proj = model.model.layers[1].self_attn.k_proj[0]
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(ValueError, match=r"layer 1's mlp.up_proj is NoneType"):
        fuse_projections(model.model)


def test_an_engine_is_made_anew_when_any_weight_moves_or_the_engines_are_cleared():
    """On a GPU an engine replays graphs that read the weights where they lay: weights moved (another dtype or
    device) or fused, or any one of them given new storage, must not reuse it."""
    from rot_model.decoding import Engines

    model = tiny_qwen3()
    engines = Engines()
    kept = engines.get(model.model, 1, 32)
    assert engines.get(model.model, 1, 32) is kept
    model.to(torch.float64)
    assert engines.get(model.model, 1, 32) is not kept
    moved = engines.get(model.model, 1, 32)
    engines.clear()
    assert engines.get(model.model, 1, 32) is not moved
    cleared = engines.get(model.model, 1, 32)
    down = model.model.layers[1].mlp.down_proj.weight  # one weight of a later layer given new storage, as DeepSpeed's
    down.data = down.data.clone()  # ZeRO-2 does to the trainable ones (its flat buffer) after the trainer's probe
    assert engines.get(model.model, 1, 32) is not cleared
