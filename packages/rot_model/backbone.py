"""Load the language model of a checkpoint, and only that, plus its tokenizer with RoT's new tokens.

A Qwen3-VL checkpoint's text decoder is the Qwen3 architecture and a Qwen2(.5)-VL one is Qwen2:
for text-only input the multimodal rotary embedding gives every section the same position, which
is plain 1-D RoPE. So the text weights are loaded into ``Qwen3ForCausalLM`` / ``Qwen2ForCausalLM``
(no vision parameters are ever created) and the rest of the project sees an ordinary causal LM that
peft, DeepSpeed and ``generate`` all know. Any other causal-LM checkpoint loads as it is.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from rot_data import hub
from rot_data.tokens import IMG_BEGIN, IMG_END
from rot_model import attention, delta

TEXT_ARCHITECTURE = {"qwen3_vl": "qwen3", "qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2"}
VISION_PREFIXES = ("model.visual.", "visual.")
TEXT_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                    "attention_bias", "pad_token_id", "eos_token_id")


def checkpoint_dir(name: str) -> Path:
    """A local folder as it is, else a hub id (fetched or cached); anything else is a one-line ``ModelNotFound``."""
    return hub.snapshot(name, "--backbone", hub.MODEL_FILES)


def weights_folders(name: str) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) of a backbone name: a RoT export's are its model/ and tokenizer/."""
    from rot_data import registry

    folder = checkpoint_dir(registry.resolve(name))
    if not (folder / "rot_config.json").exists():
        return folder, folder
    if not (folder / "model").is_dir():
        raise ValueError(f"--backbone {name} is a LoRA export: pass its base backbone and --init {name}, "
                         "or an export of a --full-finetune run")
    return folder / "model", folder / "tokenizer"


def text_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The language-model tensors of a checkpoint folder under causal-LM names ('model.*', 'lm_head.*'); a
    compact export's (rot-train compact) are its base's plus the stored differences."""
    from safetensors import safe_open

    if (folder / delta.FILE).exists():
        return delta.add(folder / delta.FILE, text_tensors(weights_folders(delta.base_name(folder / delta.FILE))[0]))
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for file_name in files:
        with safe_open(str(folder / file_name), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(VISION_PREFIXES):
                    continue
                name = "model." + key[len("model.language_model."):] if key.startswith("model.language_model.") else key
                tensors[name] = handle.get_tensor(key)
    return tensors


def text_config_of(vlm_config):
    """The causal-LM config equivalent to a VLM's text decoder."""
    from transformers import AutoConfig

    text = vlm_config.text_config.to_dict()
    rope = text.get("rope_parameters") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    kwargs = {k: text[k] for k in TEXT_CONFIG_KEYS if text.get(k) is not None}
    return AutoConfig.for_model(TEXT_ARCHITECTURE[vlm_config.model_type], **kwargs,
                                rope_parameters={"rope_type": "default", "rope_theta": theta})


def load_backbone(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
    """(causal LM, tokenizer) for a hub id or local folder ('anchor': the shipped pretrained VLM); VLM checkpoints
    give their language model only; a RoT export of a full fine-tuning run gives its trained LM (to train on). Its
    attention is transformers' SDPA with decode steps that do not copy the grouped KV cache (rot_model.attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, tokenizer_folder = weights_folders(name)  # a RoT export: train on from its fully fine-tuned LM
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder} holds no weights (model.safetensors or {delta.FILE}): if it is part of an "
                                "export, the export is incomplete; copy the whole export folder again, or export the run again")
    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    if config.model_type in TEXT_ARCHITECTURE:
        text_config = text_config_of(config)
    elif (folder / delta.FILE).exists():
        text_config = config
    else:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attention.register()).to(device), tokenizer
    tensors = text_tensors(folder)
    text_config.tie_word_embeddings = "lm_head.weight" not in tensors
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(text_config, dtype=dtype, attn_implementation=attention.register())
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and text_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"--backbone {name}: its language-model weights do not fit {type(model).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); is it a Qwen-VL checkpoint?")
    model.tie_weights()
    return model, tokenizer


def add_latent_tokens(model, tokenizer, seed: int = 0) -> dict[str, int]:
    """Add <img_begin>/<img_end>; new rows are random directions of norm sqrt(hidden) (the paper's init).

    A backbone that already has them (the anchor, pretrained with <img_begin> [visual tokens] <img_end>)
    keeps its trained rows: they already mean "visual tokens follow" and "the answer follows"."""
    vocabulary = tokenizer.get_vocab()
    new = [token for token in (IMG_BEGIN, IMG_END) if token not in vocabulary]
    tokenizer.add_tokens(new, special_tokens=True)
    ids = {IMG_BEGIN: tokenizer.convert_tokens_to_ids(IMG_BEGIN), IMG_END: tokenizer.convert_tokens_to_ids(IMG_END)}
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(ids), embeddings.shape[1], generator=generator)
    rows = rows / rows.norm(dim=1, keepdim=True) * math.sqrt(embeddings.shape[1])
    output = model.get_output_embeddings().weight
    with torch.no_grad():
        for row, (token, token_id) in zip(rows, ids.items()):
            if token not in new:
                continue
            embeddings[token_id] = row.to(embeddings)
            if output.data_ptr() != embeddings.data_ptr():  # untied head: start from the mean output row
                output[token_id] = output[: min(ids.values())].mean(0).to(output)
    return ids


def gathered(params, modifier_rank: int | None = None):
    """Whole tensors inside the block, also under ZeRO-3 (where each rank holds a slice of every parameter).

    Under ZeRO-3 this is a collective: every rank must enter it. ``modifier_rank`` = the rank whose
    in-place changes are kept and sent to the others. Outside ZeRO-3 it does nothing."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _embedding_weights(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    embeddings, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return embeddings, (None if output is embeddings or output.data_ptr() == embeddings.data_ptr() else output)


def token_rows(model, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """The added tokens' input (and untied output) rows: they are not in the backbone checkpoint, so exports carry them."""
    embeddings, output = _embedding_weights(model)
    with gathered([w for w in (embeddings, output) if w is not None]):
        rows = {"input": embeddings[token_ids].detach().float().cpu().clone()}
        if output is not None:
            rows["output"] = output[token_ids].detach().float().cpu().clone()
    return rows


def set_token_rows(model, token_ids: list[int], rows: dict[str, torch.Tensor]) -> None:
    embeddings, output = _embedding_weights(model)
    with gathered([w for w in (embeddings, output) if w is not None], modifier_rank=0), torch.no_grad():
        embeddings[token_ids] = rows["input"].to(embeddings)
        if "output" in rows:
            output[token_ids] = rows["output"].to(output)
