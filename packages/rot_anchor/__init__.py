"""The anchor: a small Qwen3-VL (vision tower + language model) that this project trains from scratch and ships.

No model hub is reachable offline, and a random tower's embeddings mean nothing, so the project
pretrains its own VLM of the real architecture (``rot-anchor pretrain``) and ships the checkpoint
folder inside the package. ``anchor`` is then a model name like a hub id: ``--encoder anchor``,
``--backbone anchor``. This module only says where it lives, so importing it is cheap.
"""

from __future__ import annotations

from pathlib import Path

NAME = "anchor"
CHECKPOINT = Path(__file__).parent / "checkpoint"


def resolve(name: str) -> str:
    """A model name as given on the command line -> a hub id or folder (``anchor`` -> the shipped folder)."""
    if name != NAME:
        return name
    if not (CHECKPOINT / "config.json").exists():
        raise FileNotFoundError(f"the anchor checkpoint is missing from {CHECKPOINT}; reinstall the package "
                                "or train one with 'rot-anchor pretrain'")
    return str(CHECKPOINT)
