import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import ttpeft
from ttpeft import LorettaAdpConfig, LorettaRepConfig
from ttpeft.tuners.loretta_adp import LorettaAdpHead, LorettaAdpLinear

from loretta_helpers import (
    logits,
    logits_after_reload,
    tiny_bert,
    tiny_llama,
    tiny_roberta,
    token_batch,
    train_steps,
)


def adp(model, **kwargs):
    kwargs.setdefault("bottleneck_size", 8)
    kwargs.setdefault("tensor_rank", 3)
    return get_peft_model(model, LorettaAdpConfig(**kwargs))


def placements(model):
    return {name: m.loretta_adp_placement["default"] for name, m in model.named_modules()
            if isinstance(m, LorettaAdpLinear)}


def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["LORETTA_ADP"] is LorettaAdpConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["LORETTA_ADP"] is ttpeft.LorettaAdpModel


def test_llama_placement_inputs_before_gate_and_up_output_after_down():
    model = adp(tiny_llama())
    found = placements(model)
    assert len(found) == 6
    for name, placement in found.items():
        expected = "output" if name.endswith("down_proj") else "input"
        assert name.endswith(("gate_proj", "up_proj", "down_proj")) and placement == expected, name
    mlp = model.base_model.model.model.layers[0].mlp
    for layer in (mlp.gate_proj, mlp.up_proj):
        assert layer.loretta_adp_width["default"] == 32  # acts on the hidden size, the layer's input
    assert mlp.down_proj.loretta_adp_width["default"] == 32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("input_layernorm.modules_to_save" in n for n in trainable)
    assert any("model.norm.modules_to_save" in n for n in trainable)


def test_input_and_output_adapters_compute_what_they_claim():
    model = adp(tiny_llama(), init="reference")
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    gate = mlp.gate_proj
    torch.testing.assert_close(gate(x), gate.get_base_layer()(x + gate.adapter_output("default", x)))
    down = mlp.down_proj
    h = torch.randn(2, 5, 48)
    base_out = down.get_base_layer()(h)
    torch.testing.assert_close(down(h), base_out + down.adapter_output("default", base_out))


def test_parallel_adapter_maps_the_layer_input_to_its_output_and_reloads(tmp_path):
    inputs = token_batch()
    base = logits(tiny_bert(), inputs)
    model = adp(tiny_bert(), task_type="SEQ_CLS", target_modules=["intermediate.dense", "output.dense"],
                parallel_adapter_modules=["intermediate.dense"])
    layer = model.base_model.model.bert.encoder.layer[0]
    assert layer.intermediate.dense.loretta_adp_placement["default"] == "parallel"
    assert layer.output.dense.loretta_adp_placement["default"] == "output"
    torch.testing.assert_close(logits(model, inputs), base)  # up's zero core: starts at the base
    train_steps(model, inputs)
    dense = layer.intermediate.dense  # 32 -> 64 in tiny_bert: down reads 32 features, up writes 64
    assert dense.loretta_adp_up_bias["default"].shape == (64,)
    x = torch.randn(2, 5, 32)
    beside = dense.adapter_output("default", x)
    assert beside.shape == (2, 5, 64) and beside.abs().max() > 0
    torch.testing.assert_close(dense(x), dense.get_base_layer()(x) + beside)
    with model.disable_adapter():
        torch.testing.assert_close(dense(x), dense.get_base_layer()(x))
    dense.loretta_adp_contraction["default"] = "sequential"
    torch.testing.assert_close(dense.adapter_output("default", x), beside)
    dense.loretta_adp_contraction["default"] = "split"
    # a mixed batch runs row 0 through the adapter and row 1 through the base layer
    mixed = dense(x, adapter_names=["default", "__base__"])
    torch.testing.assert_close(mixed[0], dense(x)[0])
    torch.testing.assert_close(mixed[1], dense.get_base_layer()(x)[1])
    torch.testing.assert_close(logits_after_reload(model, inputs, "tiny_bert", tmp_path), logits(model, inputs))


def test_parallel_adapters_fit_a_param_budget_with_their_two_widths():
    config = dict(task_type="SEQ_CLS", target_modules=["intermediate.dense"], bottleneck_size=8,
                  param_budget=600, train_layernorms=False)
    model = get_peft_model(tiny_bert(), LorettaAdpConfig(parallel_adapter_modules=["intermediate.dense"], **config))
    adapter = sum(p.numel() for n, p in model.named_parameters() if "loretta_adp_" in n and p.requires_grad)
    assert adapter <= 600
    plan = model.peft_config["default"].layer_plan
    dense = model.base_model.model.bert.encoder.layer[0].intermediate.dense
    entry = plan["bert.encoder.layer.0.intermediate.dense"]
    assert math.prod(entry["down_tensor_shape"]) == 32 * 8 and math.prod(entry["up_tensor_shape"]) == 8 * 64
    assert dense.loretta_adp_up_bias["default"].numel() == 64 and dense.loretta_adp_down_bias["default"].numel() == 8


def test_a_target_cannot_be_both_an_input_and_a_parallel_adapter():
    config = LorettaAdpConfig(target_modules=["up_proj"], input_adapter_modules=["up_proj"],
                              parallel_adapter_modules=["up_proj"])
    with pytest.raises(ValueError) as err:
        get_peft_model(tiny_llama(), config)
    message = str(err.value)
    assert "up_proj" in message and "input_adapter_modules" in message and "parallel_adapter_modules" in message


@pytest.mark.parametrize("non_linearity, affine", [("linear", True), ("relu", False), ("gelu", False)])
def test_the_named_non_linearity_sits_between_the_projections(non_linearity, affine):
    down = adp(tiny_llama(), init="reference", non_linearity=non_linearity).base_model.model.model.layers[0].mlp.down_proj
    a, b = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    out = lambda h: down.adapter_output("default", h)  # noqa: E731
    # up(act(down(h))) is affine in h exactly when act is the identity
    assert torch.allclose(out(a + b) - out(b), out(a) - out(torch.zeros_like(a)), atol=1e-5) == affine


def test_bert_placement_after_each_output_dense():
    model = adp(tiny_bert(), task_type="SEQ_CLS")
    found = placements(model)
    assert sorted(found) == sorted(
        f"base_model.model.bert.encoder.layer.{i}.{part}.dense" for i in range(2) for part in ("attention.output",
                                                                                            "output"))
    assert set(found.values()) == {"output"}


def test_default_init_starts_at_the_base_model_and_reference_init_does_not():
    inputs = token_batch()
    for build in (tiny_bert, tiny_llama):
        base = logits(build(), inputs)
        assert torch.equal(logits(adp(build()), inputs), base)
        assert not torch.allclose(logits(adp(build(), init="reference"), inputs), base)


def test_parameter_count_per_768_adapter_matches_the_paper():
    model = nn.Sequential(nn.Linear(768, 768))
    model = get_peft_model(model, LorettaAdpConfig(target_modules=["0"], train_layernorms=False))
    # down and up trains of shape (8, 8, 12, 8, 8) at rank 5 (780 each), plus biases 64 and 768
    assert model.get_nb_trainable_parameters()[0] == 2 * 780 + 64 + 768


def test_merging_is_refused_with_a_clear_error_and_unload_gives_the_base():
    inputs = token_batch()
    base = logits(tiny_llama(), inputs)
    model = adp(tiny_llama(), init="reference")
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot be merged.*non-linearity"):
            merge()
    unloaded = model.unload()
    assert not any(isinstance(m, LorettaAdpLinear) for m in unloaded.modules())
    torch.testing.assert_close(logits(unloaded, inputs), base)


def test_normalize_input_makes_the_adapter_blind_to_its_input_scale(tmp_path):
    for normalize, same in ((True, True), (False, False)):
        model = adp(tiny_llama(), init="reference", normalize_input=normalize)
        down = model.base_model.model.model.layers[0].mlp.down_proj
        h = torch.randn(2, 5, 32, dtype=down.get_base_layer().weight.dtype)  # down_proj's output width
        with torch.no_grad():
            small, large = down.adapter_output("default", h), down.adapter_output("default", 32 * h)
        assert torch.allclose(small, large, rtol=1e-2, atol=1e-3) is same
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert reloaded.peft_config["default"].normalize_input is False
    model = adp(tiny_llama(), init="reference", normalize_input=True)
    model.save_pretrained(tmp_path / "normalised")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "normalised")
    inputs = token_batch()
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs))


def test_without_adapter_bias_an_adapter_is_its_two_trains_alone_and_reloads(tmp_path):
    model = nn.Sequential(nn.Linear(768, 768))
    config = LorettaAdpConfig(target_modules=["0"], train_layernorms=False, adapter_bias=False)
    assert get_peft_model(model, config).get_nb_trainable_parameters()[0] == 2 * 780  # 64 + 768 fewer
    inputs = token_batch()
    model = adp(tiny_bert(), task_type="SEQ_CLS", adapter_bias=False, normalize_input=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("_bias" in n for n in names) and any("loretta_adp_up" in n for n in names)
    torch.testing.assert_close(logits(model, inputs), logits(tiny_bert(), inputs))  # starts at the base
    train_steps(model, inputs)
    dense = model.base_model.model.bert.encoder.layer[0].output.dense
    h = torch.randn(2, 5, 32)
    split = dense.adapter_output("default", h)
    assert split.abs().max() > 0
    dense.loretta_adp_contraction["default"] = "sequential"
    torch.testing.assert_close(dense.adapter_output("default", h), split)
    dense.loretta_adp_contraction["default"] = "split"
    torch.testing.assert_close(logits_after_reload(model, inputs, "tiny_bert", tmp_path), logits(model, inputs))


def test_learned_scaling_is_a_trained_and_saved_parameter(tmp_path):
    inputs = token_batch()
    model = adp(tiny_llama(), scaling="learned", non_linearity="gelu", train_layernorms=False)
    train_steps(model, inputs)
    scale = model.base_model.model.model.layers[0].mlp.down_proj.loretta_adp_scale["default"]
    assert scale.requires_grad and not torch.equal(scale.detach(), torch.ones(1))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs))


def test_several_adapters_switch_disable_and_delete():
    inputs = token_batch()
    base = logits(tiny_llama(), inputs)
    model = adp(tiny_llama(), init="reference")
    first = logits(model, inputs)
    model.add_adapter("other", LorettaAdpConfig(bottleneck_size=4, tensor_rank=2, init="reference"))
    assert torch.equal(logits(model, inputs), first)
    model.set_adapter("other")
    assert not torch.allclose(logits(model, inputs), first)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, inputs), first)
    model.delete_adapter("other")
    assert all("other" not in m.loretta_adp_down for m in model.modules() if isinstance(m, LorettaAdpLinear))


def test_trained_norms_and_tensorised_head_reload_in_a_fresh_process(tmp_path):
    inputs = token_batch()
    model = adp(tiny_roberta(), task_type="SEQ_CLS", tensorised_head=True)
    assert isinstance(model.base_model.model.classifier.dense, LorettaAdpHead)
    train_steps(model, inputs)
    norm = model.base_model.model.roberta.encoder.layer[1].attention.output.LayerNorm
    assert not torch.equal(norm.modules_to_save["default"].bias, norm.original_module.bias)
    trained = logits(model, inputs)
    torch.testing.assert_close(logits_after_reload(model, inputs, "tiny_roberta", tmp_path), trained)


def test_bfloat16_base_follows_the_base_dtype():
    inputs = token_batch()
    model = adp(tiny_llama().to(torch.bfloat16), init="reference")
    out = logits(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    train_steps(model, inputs, steps=1)
    assert torch.isfinite(logits(model, inputs)).all()


def test_weight_norm_starts_at_the_base_with_up_random_and_its_gain_bounds_the_output(tmp_path):
    inputs = token_batch()
    model = adp(tiny_bert(), task_type="SEQ_CLS", normalize_input=True, weight_norm=True)
    torch.testing.assert_close(logits(model, inputs), logits(tiny_bert(), inputs))  # a zero gain: the base model
    dense = model.base_model.model.bert.encoder.layer[0].output.dense
    assert all(core.abs().min() > 0 for core in dense.loretta_adp_up["default"])  # no zero core: a direction
    train_steps(model, inputs)
    gain = dense.loretta_adp_gain["default"]
    assert gain.item() != 0
    h = torch.randn(2, 5, 32)
    bias = dense.loretta_adp_up_bias["default"]
    with torch.no_grad():
        out = dense.adapter_output("default", h) - bias
        # neither train's scale reaches the output: only the gain sets it
        for train, factor in ((dense.loretta_adp_down, 7.0), (dense.loretta_adp_up, 0.1)):
            train["default"][1].mul_(factor)
        dense.factor_cache.entries.clear()
        torch.testing.assert_close(dense.adapter_output("default", h) - bias, out)
        gain.mul_(3.0)
        torch.testing.assert_close(dense.adapter_output("default", h) - bias, 3.0 * out)
        gain.div_(3.0)
        # per token, up's part is at most |gain| times the bottleneck activation's norm (up has unit norm)
        down = dense.factor_cache.factors(dense.factor_ref("default"))[0]
        z = torch.relu(h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() @ (down * (8 / 3) ** 0.5 / down.norm())
                       + dense.loretta_adp_down_bias["default"])
        assert (out.norm(dim=-1) <= gain.abs() * z.norm(dim=-1) * (1 + 1e-5)).all()
        assert (out.norm(dim=-1) > 0.05 * gain.abs() * z.norm(dim=-1)).any()
    split = dense.adapter_output("default", h)
    dense.loretta_adp_contraction["default"] = "sequential"
    torch.testing.assert_close(dense.adapter_output("default", h), split)
    dense.loretta_adp_contraction["default"] = "split"
    torch.testing.assert_close(logits_after_reload(model, inputs, "tiny_bert", tmp_path), logits(model, inputs))


@pytest.mark.parametrize("kwargs, words", [
    ({"bottleneck_size": 0}, ["bottleneck_size=0", "int >= 1"]),
    ({"non_linearity": "swishy"}, ["non_linearity='swishy'", "relu"]),
    ({"scaling": "big"}, ["scaling='big'", "'learned'"]),
    ({"init": "bert"}, ["init='bert'", "'zero'"]),
    ({"input_adapter_modules": "gate_proj"}, ["input_adapter_modules", "list of module names"]),
    ({"parallel_adapter_modules": [1]}, ["parallel_adapter_modules=[1]", "list of module names"]),
    ({"normalize_input": "yes"}, ["normalize_input='yes'", "True or False"]),
    ({"adapter_bias": 0}, ["adapter_bias=0", "True or False"]),
    ({"weight_norm": 1}, ["weight_norm=1", "True or False"]),
    ({"weight_norm": True, "init": "reference"}, ["weight_norm=True", "init='reference'", "init='zero'"]),
])
def test_bad_config_values_raise_clear_errors(kwargs, words):
    with pytest.raises(ValueError) as err:
        LorettaAdpConfig(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_shape_for_a_layer_names_the_module_value_and_what_is_valid():
    with pytest.raises(ValueError) as err:
        adp(tiny_llama(), up_tensor_shape=[2, 2])
    message = str(err.value)
    assert "gate_proj" in message and "up_tensor_shape=[2, 2]" in message and str(8 * 32) in message


def test_unknown_architecture_without_targets_is_an_error():
    with pytest.raises(ValueError, match="pass target_modules"):
        get_peft_model(nn.Sequential(nn.Linear(8, 8)), LorettaAdpConfig())


def test_any_width_including_odd_ones():
    model = nn.Sequential(nn.Linear(12, 1000), nn.Linear(1000, 4097))
    model = get_peft_model(model, LorettaAdpConfig(target_modules=["0", "1"], init="reference"))
    assert model(torch.randn(2, 12)).shape == (2, 4097)


def minilm():
    from transformers import AutoModel

    from ttpeft.models import minilm_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoModel.from_pretrained(minilm_path()).eval()


@pytest.mark.real_model
@pytest.mark.parametrize("config", [LorettaAdpConfig(), LorettaRepConfig()], ids=["adp", "rep"])
def test_real_minilm_starts_at_the_base_trains_and_round_trips(config, tmp_path):
    inputs = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    base = minilm()(input_ids=inputs).last_hidden_state.detach()
    model = get_peft_model(minilm(), config)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=inputs).last_hidden_state, base)
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimiser.zero_grad()
        model(input_ids=inputs).last_hidden_state.pow(2).mean().backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=inputs).last_hidden_state
    assert not torch.allclose(trained, base)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(minilm(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs).last_hidden_state, trained)
