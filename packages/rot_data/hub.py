"""Model names the way a user gives them: a local folder, or a hub id fetched (or found in the local cache).

Why one place: an offline machine asked for a hub id used to print hundreds of lines ending in
``LocalEntryNotFoundError`` without naming the model; every command now says which name, that the hub could not
be reached, and what to pass instead, in one line (``ModelNotFound`` is a ``ValueError``, which the CLIs report).
"""

from __future__ import annotations

from pathlib import Path


MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]  # configs, weights, tokenizer, chat template


class ModelNotFound(ValueError):
    """A model name that is no local folder and that the hub (or its cache) cannot give."""


def _explain(name: str, flag: str, error: Exception) -> ModelNotFound:
    kind = type(error).__name__
    if "NotFound" in kind and "Entry" not in kind:
        why = "no such repository on the hub"
    elif "Entry" in kind or "Offline" in kind or "Connect" in kind or "Timeout" in kind:
        why = "not a local folder, and the hub cannot be reached (offline?) nor does its local cache hold it"
    else:
        why = f"{kind}: {str(error).splitlines()[0][:120]}" if str(error) else kind
    return ModelNotFound(f"{flag} {name}: {why}; pass the path of a local checkpoint folder")


def snapshot(name: str, flag: str, allow_patterns: list[str]) -> Path:
    """``name`` as a local folder: itself, or the hub snapshot of the files matching ``allow_patterns``."""
    if Path(name).is_dir():
        return Path(name)
    if Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFound(f"{flag} {name}: no such checkpoint folder; pass the path of a local checkpoint folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns))
    except Exception as error:  # huggingface_hub raises a family of types (offline, missing repo, HTTP)
        raise _explain(name, flag, error) from None


def file_of(name: str, file_name: str, flag: str) -> Path:
    """One file of a hub model (a weights file the snapshot of configs did not fetch)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, file_name))
    except Exception as error:
        raise _explain(name, flag, error) from None
