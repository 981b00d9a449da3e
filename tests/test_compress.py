import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import ttpeft
from ttpeft.compress import REPORT_FILE, compress_lora, low_rank_error, low_rank_tt_svd
from ttpeft.tensor_train import tt_svd
from ttpeft.tt_matrix import thin_factors, tt_matrix_dense

from tiny_models import logits, tiny_bert, tiny_gpt2, token_batch

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CASES = {
    "bert": dict(build=tiny_bert, targets=["query", "value", "dense"], task="SEQ_CLS"),
    "gpt2": dict(build=tiny_gpt2, targets=["c_attn", "c_proj"], task="CAUSAL_LM"),
}


def random_lora(case, r=4, seed=3, **kwargs):
    """A LoRA adapter with random (non-zero) B, so that ΔW is a generic rank-r matrix."""
    spec = CASES[case]
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=spec["targets"], task_type=spec["task"], **kwargs)
    model = get_peft_model(spec["build"](), config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
    return model.eval()


def lora_deltas(model):
    """ΔW of every LoRA layer in (out, in) layout (peft gives Conv1D layers' transposed)."""
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            delta = module.get_delta_weight("default")
            deltas[name.removeprefix("base_model.model.")] = delta.T if module.fan_in_fan_out else delta
    return deltas


def tt_deltas(model):
    return {name.removeprefix("base_model.model."): module.get_delta_weight("default")
            for name, module in model.named_modules() if hasattr(module, "ttlora_cores")}


@pytest.mark.parametrize("rows,cols", [((4, 3, 2), (2, 3, 4)), ((24,), (6, 6)), ((6, 4), (36,)), ((5,), (7,))])
@pytest.mark.parametrize("rel_error", [None, 0.1, 0.5])
def test_low_rank_tt_svd_equals_tt_svd_of_the_dense_product(rows, cols, rel_error):
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(math.prod(rows), 3, generator=generator, dtype=torch.float64)
    right = torch.randn(3, math.prod(cols), generator=generator, dtype=torch.float64)
    dense = left @ right
    train = low_rank_tt_svd(left, right, rows, cols, rel_error=rel_error)
    reference = tt_svd(dense.reshape(rows + cols), rel_error=rel_error)
    ours = tt_matrix_dense(train.cores, len(rows))
    if rel_error is not None:  # exact trains may keep zero singular values at different bonds
        assert train.ranks == reference.ranks
    torch.testing.assert_close(ours, reference.to_dense().reshape(dense.shape))
    error, norm = low_rank_error(left, right, *thin_factors(train.cores, len(rows)))
    assert error <= (rel_error or 1e-12) * norm + 1e-9
    assert math.isclose(error, float(torch.linalg.norm(dense - ours)), rel_tol=1e-6, abs_tol=1e-9)


def test_low_rank_tt_svd_never_forms_the_dense_update():
    # A 65536 x 65536 update would need 32 GiB in float64; its rank-4 factors take 4 MiB.
    width = 2 ** 16
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(width, 4, generator=generator), torch.randn(4, width, generator=generator)
    started = time.perf_counter()
    train = low_rank_tt_svd(left, right, (64, 32, 32), (32, 32, 64), max_rank=4)
    assert time.perf_counter() - started < 20
    assert max(train.ranks) <= 4
    error, norm = low_rank_error(left, right, *thin_factors(train.cores, 3))
    assert error < norm  # a rank-4 cap on a rank-4 update: a valid, not exact, approximation


@pytest.mark.parametrize("case", CASES)
def test_full_rank_compression_recovers_the_lora_exactly(case):
    lora = random_lora(case)
    inputs = token_batch()
    compressed = compress_lora(lora)
    model = compressed.to_peft_model(CASES[case]["build"]())
    expected, got = lora_deltas(lora), tt_deltas(model)
    assert expected.keys() == got.keys() and len(got) >= 4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(model, inputs), logits(lora, inputs), atol=1e-4, rtol=1e-4)
    assert compressed.report["total"]["max_layer_rel_error"] < 1e-5


@pytest.mark.parametrize("rel_error", [0.05, 0.3, 0.7])
def test_compression_stays_within_the_requested_error(rel_error):
    lora = random_lora("bert", r=6)
    compressed = compress_lora(lora, rel_error=rel_error, factors_per_side=3)  # 3 factors must truncate
    model = compressed.to_peft_model(tiny_bert())
    expected, got = lora_deltas(lora), tt_deltas(model)
    worst = 0.0
    for name, delta in expected.items():
        error = float(torch.linalg.norm(got[name] - delta) / torch.linalg.norm(delta))
        assert error <= rel_error + 1e-6
        reported = next(row for row in compressed.report["layers"] if row["module"] == name)["rel_error"]
        assert math.isclose(error, reported, rel_tol=1e-4, abs_tol=1e-6)
        worst = max(worst, error)
    assert worst > rel_error / 10  # it did truncate


def test_rank_cap_and_parameter_budget():
    lora = random_lora("bert")
    capped = compress_lora(lora, tt_rank=2)
    assert all(max(row["tt_rank"]) <= 2 for row in capped.report["layers"])
    before = capped.report["total"]["params_before"]
    budgeted = compress_lora(lora, param_budget=before // 3)
    total = budgeted.report["total"]
    assert total["params_after"] <= before // 3
    model = budgeted.to_peft_model(tiny_bert())
    assert sum(p.numel() for n, p in model.named_parameters() if "ttlora_cores" in n) == total["params_after"]
    with pytest.raises(ValueError, match=r"minimum is [\d,]+ parameters"):
        compress_lora(lora, param_budget=10)


def test_automatic_factor_count_picks_the_lowest_error_under_a_budget_and_fewest_params_under_an_error():
    lora = random_lora("bert")
    budget = compress_lora(lora, tt_rank=1, factors_per_side=3).report["total"]["params_before"] // 4
    chosen = compress_lora(lora, param_budget=budget)
    settings, total = chosen.report["settings"], chosen.report["total"]
    assert total["params_after"] <= budget
    for count in (2, 3, 4):
        explicit = compress_lora(lora, param_budget=budget, factors_per_side=count).report["total"]
        assert total["rel_error"] <= explicit["rel_error"] + 1e-9
    assert settings["factors_per_side"] in (1, 2, 3, 4)
    assert len(chosen.config.layer_plan[next(iter(chosen.config.layer_plan))]["tt_shape"][0]) <= settings[
        "factors_per_side"]
    by_error = compress_lora(lora, rel_error=0.3)
    for count in (1, 2, 3):
        explicit = compress_lora(lora, rel_error=0.3, factors_per_side=count).report["total"]
        assert by_error.report["total"]["params_after"] <= explicit["params_after"]
    # A rank cap or no setting keeps TT-LoRA's default of 3 factors per side.
    assert compress_lora(lora, tt_rank=2).report["settings"]["factors_per_side"] == 3
    with pytest.raises(ValueError, match="factors_per_side=0"):
        compress_lora(lora, param_budget=budget, factors_per_side=0)


def test_folder_and_model_give_the_same_adapter(tmp_path):
    lora = random_lora("gpt2")
    lora.save_pretrained(str(tmp_path / "lora"))
    from_model = compress_lora(lora, rel_error=0.2)
    from_folder = compress_lora(tmp_path / "lora", rel_error=0.2)
    assert from_model.state_dict.keys() == from_folder.state_dict.keys()
    for key in from_model.state_dict:
        torch.testing.assert_close(from_model.state_dict[key], from_folder.state_dict[key])


def test_written_adapter_reloads_in_a_fresh_process(tmp_path):
    lora = random_lora("bert")
    compressed = compress_lora(lora, tt_rank=3, output_dir=tmp_path / "tt")
    inputs = token_batch()
    torch.save(logits(compressed.to_peft_model(tiny_bert()), inputs), tmp_path / "expected.pt")
    report = json.loads((tmp_path / "tt" / REPORT_FILE).read_text())
    assert report["total"]["params_after"] < report["total"]["params_before"]
    assert {"rel_error", "params_before", "params_after", "bytes_before", "bytes_after"} <= set(report["layers"][0])
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {TESTS_DIR!r})
        import ttpeft
        from peft import PeftModel
        from tiny_models import logits, tiny_bert, token_batch
        model = PeftModel.from_pretrained(tiny_bert(), {str(tmp_path / "tt")!r})
        assert type(model.base_model).__name__ == "TTLoraModel"
        torch.testing.assert_close(logits(model, token_batch()), torch.load({str(tmp_path / "expected.pt")!r}))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_rslora_and_alpha_pattern_scalings_are_honoured():
    lora = random_lora("bert", use_rslora=True, alpha_pattern={"value": 3.0})
    model = compress_lora(lora).to_peft_model(tiny_bert())
    expected, got = lora_deltas(lora), tt_deltas(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4)


def test_unsupported_adapters_are_refused():
    with pytest.raises(ValueError, match="DoRA"):
        compress_lora(random_lora("bert", use_dora=True))
    with pytest.raises(ValueError, match="not both"):
        compress_lora(random_lora("bert"), rel_error=0.1, param_budget=100)


def test_compress_and_plan_commands(tmp_path, capsys):
    from ttpeft.cli import main

    random_lora("bert").save_pretrained(str(tmp_path / "lora"))
    assert main(["compress", str(tmp_path / "lora"), "--output-dir", str(tmp_path / "tt"), "--tt-rank", "2"]) == 0
    assert "relative error" in capsys.readouterr().out
    assert (tmp_path / "tt" / "adapter_config.json").is_file() and (tmp_path / "tt" / REPORT_FILE).is_file()
    assert main(["compress", str(tmp_path / "lora"), "--output-dir", str(tmp_path / "x"), "--param-budget", "5"]) == 2
    assert "minimum is" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-2-7b", "--param-budget", "500000"]) == 0
    assert "ttlora: 64 layers" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-2-7b", "--param-budget", "100"]) == 2
    assert "minimum is" in capsys.readouterr().err


def test_plan_reads_a_regex_target_as_train_does(capsys):
    from ttpeft.cli import main

    command = ["plan", "--model", "minilm", "--method", "loretta_adp", "--param-budget", "7000"]
    assert main(command) == 0
    assert "loretta_adp: 12 layers" in capsys.readouterr().out
    assert main(command + ["--target-modules", r".*layer\.\d+\.output\.dense"]) == 0  # FFN outputs only
    assert "loretta_adp: 6 layers" in capsys.readouterr().out
