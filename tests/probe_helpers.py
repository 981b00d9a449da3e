"""Loading a benchmark probe (a `sitecustomize.py` under benchmarks/quality/probes/) inside a test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ttpeft import training
from ttpeft.tuners.loretta_adp import layer as adp_layer
from ttpeft.tuners.loretta_adp import model as adp_model
from ttpeft.tuners.ttlora import layer as ttlora_layer

PROBES = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "probes"


def patched_apply_method(monkeypatch, probe: str, env: str):
    """`training.apply_method` as the probe's sitecustomize leaves it; what the probes patch is restored
    after the test."""
    monkeypatch.setenv(env, "1")
    for owner, name in ((training, "apply_method"), (ttlora_layer, "base_layer_features"),
                        (adp_layer, "base_layer_features"), (adp_model.LorettaAdpModel, "_create_and_replace")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    spec = importlib.util.spec_from_file_location(f"probe_{probe}", PROBES / probe / "sitecustomize.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return training.apply_method
