"""The models this project trains from scratch and ships, by name: ``anchor``, ``rot-4x4`` and ``rot-5x5``.

``anchor`` is a small Qwen3-VL (vision tower + language model).
No model hub is reachable offline, and a random tower's embeddings mean nothing, so the project
pretrains its own VLM of the real architecture (``rot-anchor pretrain``) and ships the checkpoint
folder inside the package. ``anchor`` is then a model name like a hub id: ``--encoder anchor``,
``--backbone anchor``. ``rot-4x4`` and ``rot-5x5`` are RoT exports trained on the anchor for 4x4 and 5x5
multiplication (model cards: ``models/rot-4x4/README.md``, ``models/rot-5x5/README.md``): ``rot-eval run --checkpoint
rot-5x5``. This module only says where they live, so
importing it is cheap.
"""

from __future__ import annotations

from pathlib import Path

ANCHOR = "anchor"
ROT_4X4, ROT_5X5 = "rot-4x4", "rot-5x5"
MODELS = Path(__file__).parent / "models"
SHIPPED = {ANCHOR: MODELS / "anchor", ROT_4X4: MODELS / ROT_4X4, ROT_5X5: MODELS / ROT_5X5}  # name -> folder inside the package


def resolve(name: str) -> str:
    """A model name as given on the command line -> a hub id or folder (a shipped name -> its folder)."""
    folder = SHIPPED.get(name)
    if folder is None:
        return name
    if not any((folder / f).exists() for f in ("config.json", "rot_config.json")):
        raise FileNotFoundError(f"the shipped model '{name}' is missing from {folder}; reinstall the package"
                                + (" or train one with 'rot-anchor pretrain'" if name == ANCHOR else ""))
    return str(folder)
