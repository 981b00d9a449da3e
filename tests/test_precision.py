"""--precision: bf16/fp16 autocast while the trainable TT cores stay fp32 master weights; fp16 needs CUDA."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import ttpeft  # noqa: F401  (registers the tensor-train methods with peft)
from ttpeft import training
from ttpeft.cli import main
from ttpeft.methods import get_method
from ttpeft.models import minilm_path
from ttpeft.tasks import get_task, load_task_data

SMALL = ["--data-dir", "embedded", "--max-train-samples", "16", "--max-eval-samples", "8", "--max-length", "32",
         "--epochs", "1", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from tiny_models import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "bert")


def _fit(precision: str, model_dir: str, tmp_path):
    """TT-LoRA on the tiny classifier for two steps; returns (trained model, summary, cores before)."""
    task = get_task("sst2")
    source = training.resolve_model(model_dir)
    model, tokenizer = training.load_model(source, task, training.ENCODER)
    torch.manual_seed(0)
    model, _ = training.apply_method(model, get_method("ttlora"), {"init": "random"}, training.ENCODER)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    settings = training.TrainSettings(epochs=1, lr=1e-2, batch_size=8, max_length=32, progress=False,
                                      warmup_fraction=0.0, precision=precision)
    train_set = load_task_data(task, "embedded").train.select(range(16))
    summary, trainer = training.fit(model, tokenizer, task, train_set, training.ENCODER, settings,
                                    str(tmp_path / f"work-{precision}"))
    return model, summary, trainer, before


def _cores(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if "ttlora_cores" in n}


def test_bf16_on_cpu_autocasts_and_keeps_fp32_cores(tiny_classifier, tmp_path):
    model, summary, trainer, before = _fit("bf16", tiny_classifier, tmp_path)
    assert trainer.args.bf16 and summary["precision"] == "bf16" and summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # master weights
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items() if "ttlora_cores" in n)

    # the same run in fp32 ends close but not identical: bf16 really was used for the forward and backward
    fp32_model, fp32_summary, _, _ = _fit("fp32", tiny_classifier, tmp_path)
    bf16_cores, fp32_cores = _cores(model), _cores(fp32_model)
    assert any(not torch.equal(bf16_cores[n], fp32_cores[n]) for n in fp32_cores)
    for name in fp32_cores:
        torch.testing.assert_close(bf16_cores[name], fp32_cores[name], rtol=0, atol=5e-2)
    assert summary["train_loss"] == pytest.approx(fp32_summary["train_loss"], abs=5e-2)


def test_cli_bf16_run_records_precision_and_saves_fp32_cores(tiny_classifier, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_classifier, *SMALL, "--precision", "bf16", "--output-dir", str(run)]) == 0
    assert ", bf16" in capsys.readouterr().out
    saved = json.loads((run / "results.json").read_text())
    assert saved["precision"] == saved["settings"]["precision"] == saved["train"]["precision"] == "bf16"
    assert torch.isfinite(torch.tensor(saved["train"]["train_loss"]))
    adapter = load_file(str(run / "adapter_model.safetensors"))
    cores = [t for name, t in adapter.items() if "ttlora_cores" in name]
    assert cores and all(t.dtype == torch.float32 for t in cores)
    assert any(t.abs().max() > 0 for name, t in adapter.items() if name.endswith("ttlora_cores.5"))  # trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only where there is no CUDA")
def test_fp16_on_cpu_is_a_one_line_error_naming_what_is_valid(tiny_classifier, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_classifier, *SMALL, "--precision", "fp16", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--precision fp16" in err and "CUDA" in err and "--precision bf16" in err and "--precision fp32" in err
    assert not run.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--precision", "fp8"])
    assert exit_info.value.code == 2
    assert "--precision: invalid choice: 'fp8'" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 training needs CUDA (the Trainer scales the loss there)")
def test_fp16_on_cuda_trains_with_fp32_cores(tmp_path):
    task = get_task("sst2")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    from tiny_models import save_tiny_classifier

    model_dir = save_tiny_classifier(tmp_path / "bert")
    model, summary, trainer, before = _fit("fp16", model_dir, tmp_path)
    assert trainer.args.fp16 and next(model.parameters()).is_cuda
    assert torch.isfinite(torch.tensor(summary["train_loss"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(not torch.equal(p.cpu(), before[n].cpu()) for n, p in model.named_parameters() if n in before)
    metrics = training.evaluate(model, tokenizer, task, load_task_data(task, "embedded").validation.select(range(8)),
                                training.ENCODER, 32, 8, progress=False)
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_trains_a_float32_head(stored, tmp_path):
    from tiny_models import save_tiny_classifier
    from transformers import AutoModelForSequenceClassification

    folder = save_tiny_classifier(tmp_path / "fp32")
    half = tmp_path / "half"
    AutoModelForSequenceClassification.from_pretrained(folder, **training.float32_weights()).to(stored).save_pretrained(half)
    AutoTokenizer.from_pretrained(folder).save_pretrained(half)
    model, _ = training.load_model(training.resolve_model(str(half)), get_task("sst2"), training.ENCODER)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out = tmp_path / "run"
    assert main(["train", "--model", str(half), "--task", "sst2", "--method", "ttlora", "--output-dir", str(out),
                 *SMALL]) == 0
    saved = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for name, t in saved.items() if "classifier" in name} == {torch.float32}
