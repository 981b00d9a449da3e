"""Probes of the accuracy benchmark that patch `ttpeft train` at interpreter start: what each promises to change;
and the probes kept as patches still apply, as the benchmark's README says they do."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from probe_helpers import patched_apply_method
from tiny_models import logits, tiny_bert, token_batch
from ttpeft import training
from ttpeft.cli import build_parser
from ttpeft.errors import InputError
from ttpeft.methods import get_method, method_config_fields


REPO = Path(__file__).resolve().parents[1]
PATCHES = sorted((REPO / "benchmarks" / "quality" / "probes").glob("*.patch"))


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
@pytest.mark.parametrize("patch", PATCHES, ids=lambda path: path.name)
def test_every_probe_patch_applies_to_this_tree(patch):
    check = subprocess.run(["git", "apply", "--check", str(patch)], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, f"{patch.name} no longer applies; rebase it onto this tree: {check.stderr}"


def method_and_fields(argv: list[str]):
    args = build_parser().parse_args(["train", *argv])
    method = get_method(args.method)
    return method, method_config_fields(method, vars(args), None)


def test_principal_start_keeps_the_model_and_fills_every_core(monkeypatch):
    apply_method = patched_apply_method(monkeypatch, "pissa_init", "TTPEFT_PROBE_PISSA")
    model, inputs = tiny_bert(), token_batch()
    before = logits(model, inputs)
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if name.endswith("query")}
    method, fields = method_and_fields(["--method", "ttlora", "--target-modules", "query,value"])
    peft_model, _ = apply_method(model, method, fields, training.ENCODER)
    torch.testing.assert_close(logits(peft_model, inputs), before, atol=1e-5, rtol=1e-5)
    layers = [m for m in peft_model.modules() if hasattr(m, "ttlora_cores")]
    assert len(layers) == 4
    for layer in layers:
        assert all(core.abs().sum() > 0 for core in layer.ttlora_cores["default"])
    for name, weight in weights.items():
        base = peft_model.get_submodule(f"base_model.model.{name}").get_base_layer().weight
        assert not torch.allclose(base, weight)  # the base holds the residual


def test_norm_weights_only_freezes_the_trained_norms_biases(monkeypatch):
    apply_method = patched_apply_method(monkeypatch, "norm_weights_only", "TTPEFT_PROBE_NORM_WEIGHTS_ONLY")
    method, fields = method_and_fields(["--method", "loretta_rep", "--target-modules", "query,value"])
    peft_model, _ = apply_method(tiny_bert(), method, fields, training.ENCODER)
    trained = [(n, p) for n, p in peft_model.named_parameters() if "LayerNorm" in n and p.requires_grad]
    assert trained and all(n.endswith("weight") for n, _ in trained)


def test_adapters_after_the_norms_wrap_each_layernorm_and_start_at_the_base_model(monkeypatch):
    apply_method = patched_apply_method(monkeypatch, "adp_after_norm", "TTPEFT_PROBE_ADP_AFTER_NORM")
    model, inputs = tiny_bert(), token_batch()
    before = logits(model, inputs)
    method, fields = method_and_fields(["--method", "loretta_adp", "--train-layernorms", "false", "--target-modules",
                                        r".*layer\.\d+\.(attention\.)?output\.LayerNorm"])
    peft_model, _ = apply_method(model, method, fields, training.ENCODER)
    wrapped = [m.get_base_layer() for m in peft_model.modules() if hasattr(m, "loretta_adp_down")]
    assert len(wrapped) == 4 and all(isinstance(base, torch.nn.LayerNorm) for base in wrapped)
    torch.testing.assert_close(logits(peft_model, inputs), before)


def test_without_the_probe_loretta_adp_refuses_a_layernorm_target():
    method, fields = method_and_fields(["--method", "loretta_adp", "--train-layernorms", "false", "--target-modules",
                                        r".*layer\.\d+\.output\.LayerNorm"])
    with pytest.raises(InputError, match="LayerNorm"):
        training.apply_method(tiny_bert(), method, fields, training.ENCODER)
