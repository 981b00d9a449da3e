import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from peft import get_peft_model

import ttpeft
from ttpeft import LorettaAdpConfig, LorettaRepConfig, TTLoraConfig
from ttpeft.budget import LayerSpec, LorettaRule, TTLoraRule, config_for_layer, plan_budget
from ttpeft.shapes import is_prime
from ttpeft.tensor_train import tt_num_params
from ttpeft.tuners.ttlora import TTLoraLinear

from tiny_models import logits, tiny_bert, token_batch

MAX_WIDTH = 16384
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def adapter_params(model, prefix):
    return sum(p.numel() for name, p in model.named_parameters() if prefix in name and "modules_to_save" not in name)


def test_plans_never_exceed_the_budget_for_every_width_up_to_16384():
    rule = TTLoraRule()
    for width in range(1, MAX_WIDTH + 1):
        # a square layer and a rectangular one of another width, at the minimum and a mid budget
        layers = [LayerSpec("square", width, width), LayerSpec("wide", width, MAX_WIDTH + 1 - width)]
        minimum = sum(rule.params(layer, 1) for layer in layers)
        for budget in (minimum, minimum + 13 * width + 5):
            plan = plan_budget(layers, budget, rule)
            assert minimum <= plan.total <= budget
            for layer in plan.layers:
                (in_factors, out_factors), ranks = layer.fields["tt_shape"], layer.fields["tt_rank"]
                assert tt_num_params(in_factors + out_factors, ranks) == layer.params


@pytest.mark.parametrize("width", [1, 2, 3, 97, 384, 768, 1021, 4096, 8191, 11008, 16381, 16384])
def test_planned_layers_build_with_exactly_the_planned_parameters(width):
    base = torch.nn.Linear(width, 768, bias=False, device="meta")
    plan = plan_budget([LayerSpec("layer", width, 768)], 4000 + 2 * width, TTLoraRule())
    config = config_for_layer(TTLoraConfig(layer_plan=plan.layer_plan()), "layer")
    with torch.device("meta"):
        layer = TTLoraLinear(base, "default", config, module_name="layer")
    assert sum(core.numel() for core in layer.ttlora_cores["default"]) == plan.total <= 4000 + 2 * width


@pytest.mark.parametrize("width", [2, 17, 768, 8191])
def test_an_impossible_budget_is_an_error_naming_the_minimum(width):
    layers = [LayerSpec(f"layer{i}", width, width) for i in range(3)]
    minimum = plan_budget(layers, 10 ** 9, TTLoraRule()).minimum
    assert minimum == 3 * tt_num_params(sum(TTLoraRule().shape(layers[0]), ()), 1)
    plan_budget(layers, minimum, TTLoraRule())
    with pytest.raises(ValueError, match=f"minimum is {minimum:,} parameters.*param_budget >= {minimum}"):
        plan_budget(layers, minimum - 1, TTLoraRule())


def test_primes_get_a_single_core_side_and_still_fit():
    width = 8191
    assert is_prime(width)
    plan = plan_budget([LayerSpec("p", width, 4096)], 100_000, TTLoraRule())
    assert plan.layers[0].fields["tt_shape"][0] == [width]
    assert plan.total <= 100_000


def test_leftover_goes_to_the_widest_layers():
    layers = [LayerSpec("narrow", 512, 512), LayerSpec("wide", 4096, 4096)]
    rule = TTLoraRule()
    level_budget = sum(rule.params(layer, 4) for layer in layers)
    step_wide = rule.params(layers[1], 5) - rule.params(layers[1], 4)
    plan = plan_budget(layers, level_budget + step_wide, rule)
    narrow, wide = plan.layers
    assert max(wide.fields["tt_rank"]) == 5 and max(narrow.fields["tt_rank"]) == 4
    assert plan.total == level_budget + step_wide


def test_balanced_factors_input_descending_output_ascending():
    plan = plan_budget([LayerSpec("l", 768, 3072)], 50_000, TTLoraRule())
    in_factors, out_factors = plan.layers[0].fields["tt_shape"]
    assert in_factors == sorted(in_factors, reverse=True) and out_factors == sorted(out_factors)
    assert max(in_factors) / min(in_factors) <= 2


BUDGET_CONFIGS = {
    "ttlora_": lambda: TTLoraConfig(param_budget=3000, target_modules=["query", "value"]),
    "loretta_rep_": lambda: LorettaRepConfig(param_budget=2500, r=4),
    "loretta_adp_": lambda: LorettaAdpConfig(param_budget=4000, bottleneck_size=8),
}


def test_every_tt_method_fits_its_budget_and_reloads_with_the_same_shapes(tmp_path):
    inputs = token_batch()
    for prefix, make_config in BUDGET_CONFIGS.items():
        config = make_config()
        model = get_peft_model(tiny_bert(), config)
        assert model.peft_config["default"].layer_plan
        assert adapter_params(model, prefix) <= config.param_budget
        for param in model.parameters():  # a non-trivial adapter, so outputs tell it apart from the base
            if param.requires_grad:
                param.data.normal_(0, 0.1)
        folder = tmp_path / prefix
        model.save_pretrained(str(folder))
        torch.save(logits(model, inputs), folder / "expected.pt")
        shapes = {name: list(p.shape) for name, p in model.named_parameters() if prefix in name}
        (folder / "shapes.json").write_text(json.dumps(shapes))
    # A fresh process rebuilds the planned shapes from adapter_config.json alone.
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {TESTS_DIR!r})
        import ttpeft
        from peft import PeftModel
        from tiny_models import logits, tiny_bert, token_batch
        for prefix in {list(BUDGET_CONFIGS)!r}:
            folder = {str(tmp_path)!r} + "/" + prefix
            model = PeftModel.from_pretrained(tiny_bert(), folder)
            shapes = {{name: list(p.shape) for name, p in model.named_parameters() if prefix in name}}
            assert shapes == json.load(open(folder + "/shapes.json")), prefix + ": core shapes differ after reload"
            torch.testing.assert_close(logits(model, token_batch()), torch.load(folder + "/expected.pt"))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("factors_per_side", [1, 2, 3])
def test_a_budget_plan_splits_each_side_into_the_configured_number_of_factors(factors_per_side):
    config = TTLoraConfig(target_modules=["query", "value"], param_budget=3000, factors_per_side=factors_per_side)
    model = get_peft_model(tiny_bert(), config)
    plan = model.peft_config["default"].layer_plan
    assert plan and all(len(entry["tt_shape"][0]) == len(entry["tt_shape"][1]) == factors_per_side
                        for entry in plan.values())
    assert adapter_params(model, "ttlora_") <= 3000


@pytest.mark.parametrize("make_config, prefix, fields", [
    (lambda cores: LorettaRepConfig(param_budget=2500, r=4, tensor_cores=cores), "loretta_rep_",
     ("a_tensor_shape", "b_tensor_shape")),
    (lambda cores: LorettaAdpConfig(param_budget=4000, bottleneck_size=8, tensor_cores=cores), "loretta_adp_",
     ("down_tensor_shape", "up_tensor_shape")),
])
@pytest.mark.parametrize("cores", [2, 3])
def test_a_loretta_budget_plan_uses_the_configured_number_of_cores(make_config, prefix, fields, cores):
    config = make_config(cores)
    model = get_peft_model(tiny_bert(), config)
    plan = model.peft_config["default"].layer_plan
    assert plan and all(len(entry[field]) == cores for entry in plan.values() for field in fields)
    assert adapter_params(model, prefix) <= config.param_budget
    trains = {}  # every train's cores are parameters named <train>.<core index>
    for name, _ in model.named_parameters():
        train, _, index = name.rpartition(".")
        if prefix in name and index.isdigit():
            trains[train] = trains.get(train, 0) + 1
    assert trains and set(trains.values()) == {cores}


def test_layer_plan_without_an_entry_for_a_target_is_a_clear_error():
    config = TTLoraConfig(target_modules=["query"], layer_plan={"elsewhere": {"tt_rank": [2, 2, 2, 2, 2]}})
    with pytest.raises(ValueError, match="layer_plan has no entry for target"):
        get_peft_model(tiny_bert(), config)


def test_invalid_budget_fields_are_rejected():
    with pytest.raises(ValueError, match="param_budget=0 is invalid"):
        TTLoraConfig(param_budget=0)
    with pytest.raises(ValueError, match="valid fields"):
        LorettaRepConfig(layer_plan={"q": {"tt_rank": 2}})


def test_loretta_adp_counts_biases_in_the_budget():
    layer = LayerSpec("l", 768, 768, width=768)
    rule = LorettaRule("loretta_adp", 64)
    plan = plan_budget([layer], 10_000, rule)
    first, second = plan.layers[0].fields["down_tensor_shape"], plan.layers[0].fields["up_tensor_shape"]
    rank = plan.layers[0].fields["tensor_rank"]
    assert plan.total == tt_num_params(first, rank) + tt_num_params(second, rank) + 64 + 768 <= 10_000
    # without biases the same budget buys a higher rank, and the plan the adapters take holds
    unbiased = plan_budget([layer], 10_000, LorettaRule("loretta_adp", 64, adapter_bias=False))
    assert unbiased.layers[0].fields["tensor_rank"] > rank
    model = get_peft_model(tiny_bert(), LorettaAdpConfig(param_budget=3000, bottleneck_size=8, adapter_bias=False,
                                                         train_layernorms=False))
    assert 2700 < adapter_params(model, "loretta_adp_") <= 3000


def test_a_weight_normalised_adapter_counts_its_gain_in_the_budget():
    from ttpeft.budget import rule_for_config

    config = LorettaAdpConfig(param_budget=3000, bottleneck_size=8, weight_norm=True, train_layernorms=False)
    assert rule_for_config(config, "loretta_adp").bias_params == 1
    model = get_peft_model(tiny_bert(), config)
    gains = [n for n, p in model.named_parameters() if "loretta_adp_gain" in n]
    assert len(gains) == len(config.layer_plan) > 0
    assert adapter_params(model, "loretta_adp_") == sum(
        tt_num_params(f["down_tensor_shape"], f["tensor_rank"]) + tt_num_params(f["up_tensor_shape"], f["tensor_rank"])
        + 8 + 32 + 1 for f in config.layer_plan.values()) <= 3000


def llama_2_7b_on_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("method", ["ttlora", "loretta_adp"])
def test_plan_for_llama_2_7b_on_the_meta_device_takes_about_a_second(method):
    from ttpeft.budget import plan_model

    model = llama_2_7b_on_meta()
    started = time.perf_counter()
    plan = plan_model(model, method, 1_000_000)
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0  # about a second on an idle core; slack for a shared machine
    expected_layers = 64 if method == "ttlora" else 96  # q,v (LoRA's default) or gate/up/down
    assert len(plan.layers) == expected_layers
    assert plan.layers[0].fields and plan.total <= 1_000_000
    assert all(p.device.type == "meta" for p in model.parameters())
