"""Write and read trained RoT weights as safetensors plus one small JSON that says how to load them.

An export folder holds:
- ``rot_config.json``: backbone id/path, stage, sizes, token ids, shard fingerprint, LoRA settings;
- ``head.safetensors``: projection head (+ input adapter);
- ``token_rows.safetensors``: embedding rows of <img_begin>/<img_end> (not in the backbone checkpoint);
- ``tokenizer/``: the tokenizer with the new tokens;
- Stage II: ``lora/`` (a peft adapter folder) or, with full fine-tuning, ``model/`` (merged weights).
``load_export`` rebuilds the model from it; tests cover the round trip.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rot_data import registry
from rot_model import delta
from rot_data.tokens import IMG_BEGIN, IMG_END
from rot_model.backbone import gathered, load_backbone, set_token_rows, text_tensors, token_rows, weights_folders
from rot_model.fused import FusedInput
from rot_model.model import RoTModel


def _cpu_state(module) -> dict[str, torch.Tensor]:
    with gathered(module.parameters()):
        return {k: v.detach().float().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def export(model: RoTModel, tokenizer, folder: Path, cfg, shard_set, token_ids: dict[str, int], write: bool = True) -> Path:
    """Every rank calls this (under ZeRO-3 the weights are gathered from all of them); ``write`` ranks write files."""
    folder = Path(folder)
    if any(isinstance(module, FusedInput) for module in model.lm.modules()):
        raise ValueError("export: this model's projections are fused for inference (rot_model.fused), and its weights "
                         "would not load back; export the model as trained, before fusing")
    head_state = {f"head.{k}": v for k, v in _cpu_state(model.head).items()}
    head_state.update({f"adapter.{k}": v for k, v in _cpu_state(model.adapter).items()})
    rows = token_rows(model.lm, list(token_ids.values()))
    weights = None if cfg.stage != 2 else "model" if cfg.full_finetune else "lora"
    # LoRA: only the adapter weights are saved (the new tokens' rows travel in token_rows.safetensors)
    lm_params = [p for n, p in model.lm.named_parameters() if weights == "model" or "lora_" in n] if weights else []
    with gathered(lm_params):
        if write:
            folder.mkdir(parents=True, exist_ok=True)
            save_file(head_state, folder / "head.safetensors")
            save_file(rows, folder / "token_rows.safetensors")
            tokenizer.save_pretrained(folder / "tokenizer")
            if weights == "model":
                model.lm.save_pretrained(folder / "model", safe_serialization=True)
            elif weights == "lora":
                model.lm.save_pretrained(folder / "lora", save_embedding_layers=False)
    if not write:
        return folder
    config = {
        "format": "rot-export/1", "stage": cfg.stage, "mode": cfg.mode, "backbone": portable_name(cfg.backbone), "weights": weights,
        "llm_dim": model.lm.config.hidden_size, "latent_dim": shard_set.dim, "head_width": cfg.head_width,
        "tokens": {IMG_BEGIN: token_ids[IMG_BEGIN], IMG_END: token_ids[IMG_END]},
        "shards_fingerprint": shard_set.fingerprint, "max_latents": cfg.max_latents, "merge_latents": cfg.merge_latents,
        "inference_latents": cfg.inference_latents if cfg.inference_latents is not None
        else inference_budget(shard_set, cfg.max_latents, cfg.merge_latents), "latent_gradient": cfg.latent_gradient,
        "train_config": asdict(cfg),
    }
    (folder / "rot_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


DEFAULT_INFERENCE_LATENTS = 32  # the paper's budget for GSM8k-style tasks; exports older than the recorded budget


def latent_budget(rot_config: dict, latents: int | None = None) -> int:
    """The latents to decode: ``latents`` when given (0 included: refused, not read as 'not given'), else the budget
    the export recorded (exports older than that record: the paper's 32)."""
    budget = rot_config.get("inference_latents", DEFAULT_INFERENCE_LATENTS) if latents is None else latents
    if budget < 1:
        raise ValueError(f"--latents {budget}: a RoT model decodes at least 1 latent (the SFT-noCoT baseline answers with none)")
    return budget


def inference_budget(shard_set, max_latents: int | None = None, merge: int = 1) -> int:
    """The default latent budget at inference: the mean number of latents per training row (visual tokens / ``merge``),
    or the training cap when it is lower (a model trained with ``--max-latents C`` answers after latent C)."""
    mean = max(1, round(shard_set.manifest["tokens"] / max(1, shard_set.manifest["rows"]) / merge))
    return min(mean, max_latents) if max_latents else mean


def latent_merge(rot_config: dict) -> int:
    """Visual tokens per latent the export was trained with (``--merge-latents``; exports before it: 1)."""
    return rot_config.get("merge_latents", 1)


def portable_name(backbone: str) -> str:
    """A local folder as an absolute path (so the export loads from any working directory); hub ids and
    'anchor' as they are."""
    return str(Path(backbone).resolve()) if Path(backbone).is_dir() else backbone


def export_folder(name: Path | str) -> Path:
    """An export folder, or the name of a shipped one ('rot-4x4') -> its folder."""
    return Path(registry.resolve(str(name)))


def read_config(folder: Path | str) -> dict:
    path = export_folder(folder) / "rot_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: pass the export folder a training run wrote (<--out>/export) "
                                f"or a shipped model ('{registry.ROT_4X4}', '{registry.ROT_5X5}')")
    return json.loads(path.read_text())


def load_head(model: RoTModel, folder: Path | str, shard_set=None) -> dict:
    """Load head, adapter and new-token rows from an export into ``model`` (checks the sizes first)."""
    folder = export_folder(folder)
    config = read_config(folder)
    if shard_set is not None:
        shard_set.check_dim(config["latent_dim"], f"the head in {folder}")
    if config["llm_dim"] != model.lm.config.hidden_size:
        raise ValueError(f"{folder} holds a head for an LLM of hidden size {config['llm_dim']}, the backbone has "
                         f"{model.lm.config.hidden_size}; pass the backbone that Stage I used ({config['backbone']})")
    state = load_file(Path(folder) / "head.safetensors")
    model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    model.adapter.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("adapter.")})
    set_token_rows(model.lm, list(config["tokens"].values()), load_file(Path(folder) / "token_rows.safetensors"))
    return config


def load_export(folder: Path | str, device="cpu", dtype=torch.float32) -> tuple[RoTModel, object, dict]:
    """Rebuild (model, tokenizer, config) from an export folder, ready for generation."""
    from transformers import AutoTokenizer

    folder = export_folder(folder)
    config = read_config(folder)
    if config["weights"] == "model":
        lm, _ = load_backbone(str(folder / "model"), dtype=dtype, device=device)
    else:
        lm, _ = load_backbone(config["backbone"], dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = RoTModel(lm, config["latent_dim"], config["tokens"][IMG_BEGIN], config["tokens"][IMG_END], config["head_width"])
    load_head(model, folder)
    if config["weights"] == "lora":
        from peft import PeftModel

        model.lm = PeftModel.from_pretrained(lm, folder / "lora")
    return model.to(device, dtype).eval(), tokenizer, config


def compact(folder: Path | str, out: Path | str, base: str = registry.ANCHOR, bits: int = 8) -> dict:
    """A copy of a full fine-tuning export whose LLM weights are their difference from ``base`` in ``bits`` bits
    (rot_model.delta) and whose head is bf16; it loads everywhere an export does. Returns the sizes, for the summary."""
    folder, out = export_folder(folder), Path(out)
    if read_config(folder)["weights"] != "model":
        raise ValueError(f"{folder} is a LoRA export, already small: only a --full-finetune export is made compact")
    if out.exists():
        raise ValueError(f"--out {out} exists: name a new folder")
    model = folder / "model"
    tensors = text_tensors(model)
    shutil.copytree(folder, out, ignore=lambda _, names: [n for n in names if n in ("model.safetensors", "head.safetensors")])
    counts = delta.write(tensors, text_tensors(weights_folders(base)[0]), base, out / "model" / delta.FILE, bits)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(folder / "head.safetensors").items()}, out / "head.safetensors")
    return {**counts, "bytes_before": _bytes(folder), "bytes_after": _bytes(out)}


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def plot_losses(metrics_file: Path, png: Path) -> None:
    """Loss curves of a run (one panel per loss) for a person to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    keys = [k for k in ("loss", "mse", "read", "lm", "latent_norm", "rolled_out") if any(k in r for r in rows)]
    if not rows or not keys:
        return
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for axis, key in zip(list(axes) if len(keys) > 1 else [axes], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        axis.plot(*zip(*points))
        axis.set_title(key)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
