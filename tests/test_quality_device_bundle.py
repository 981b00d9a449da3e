"""The grid's bundle for a GPU machine: the model's weights in fp16, the tasks' parquet files, nothing overwritten."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import save_tiny_classifier
from ttpeft import training
from ttpeft.tasks.specs import get_task

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"
EMBEDDED_DATA = Path(training.__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def device_bundle():
    sys.path.insert(0, str(QUALITY))
    try:
        spec = importlib.util.spec_from_file_location("quality_device_bundle", QUALITY / "device_bundle.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(QUALITY))
    return module


def test_bundle_holds_a_half_precision_copy_that_loads_as_the_model(device_bundle, tmp_path, capsys):
    model_dir = save_tiny_classifier(tmp_path / "model")
    out = tmp_path / "bundle"
    assert device_bundle.main(["--model", model_dir, "--data-dir", str(EMBEDDED_DATA), "--tasks", "sst2",
                               "--out", str(out)]) == 0
    weights = load_file(out / "model" / "model.safetensors")
    original = load_file(Path(model_dir) / "model.safetensors")
    assert weights.keys() == original.keys()
    assert all(weights[k].dtype == torch.float16 for k in weights if original[k].is_floating_point())
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer_config.json").is_file()
    for split in ("train", "validation"):
        assert (out / "data" / "glue" / "sst2" / f"{split}.parquet").read_bytes() == \
            (EMBEDDED_DATA / "glue" / "sst2" / f"{split}.parquet").read_bytes()
    assert "MiB" in capsys.readouterr().out

    task = get_task("sst2")
    half, tokenizer = training.load_model(training.resolve_model(str(out / "model")), task, training.ENCODER)
    full, _ = training.load_model(training.resolve_model(model_dir), task, training.ENCODER)
    assert all(p.dtype == torch.float32 for p in half.parameters())
    inputs = tokenizer(["a fine film", "dull and long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(half.eval()(**inputs).logits, full.eval()(**inputs).logits, atol=2e-3, rtol=0)


def test_bundle_refuses_an_existing_folder_and_a_task_without_data(device_bundle, tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "model")
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        device_bundle.main(["--model", model_dir, "--out", str(tmp_path / "taken")])
    with pytest.raises(SystemExit, match="rte"):
        device_bundle.main(["--model", model_dir, "--data-dir", str(EMBEDDED_DATA), "--tasks", "rte",
                            "--out", str(tmp_path / "new")])
