import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import ttpeft
from ttpeft import LorettaRepConfig
from ttpeft.tuners.loretta_common import tt_weight
from ttpeft.tuners.loretta_rep import LorettaRepHead, LorettaRepLinear

from loretta_helpers import logits, logits_after_reload, tiny_bert, tiny_roberta, token_batch, train_steps


def rep(model, **kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("tensor_rank", 3)
    return get_peft_model(model, LorettaRepConfig(**kwargs))


def adapted_layers(model):
    return [m for m in model.modules() if isinstance(m, LorettaRepLinear)]


def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["LORETTA_REP"] is LorettaRepConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["LORETTA_REP"] is ttpeft.LorettaRepModel


def test_default_init_starts_at_the_base_model_and_reference_init_does_not():
    inputs = token_batch()
    base = logits(tiny_bert(), inputs)
    assert torch.equal(logits(rep(tiny_bert(), task_type="SEQ_CLS"), inputs), base)
    assert not torch.allclose(logits(rep(tiny_bert(), task_type="SEQ_CLS", init="reference"), inputs), base)


def test_default_targets_and_trainable_parts():
    model = rep(tiny_bert(), task_type="SEQ_CLS")
    names = sorted(model.base_model.targeted_module_names)
    assert names and all(n.endswith(("query", "value")) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("loretta_rep_A" in n for n in trainable) and any("loretta_rep_B" in n for n in trainable)
    assert any("LayerNorm.modules_to_save" in n for n in trainable)
    assert not any(".query.base_layer" in n or "intermediate.dense.weight" in n for n in trainable)


def test_forward_is_lora_with_tensorised_factors_applied_thin():
    model = rep(tiny_bert(hidden=48), task_type="SEQ_CLS", r=8, init="reference")
    layer = adapted_layers(model)[0]
    # applied as LoRA's two thin factors (A scaled-free, B scaled by alpha / r), never as an in x out matrix
    row_factor, col_factor = layer.factor_cache.factors(layer.factor_ref("default"))
    assert row_factor.shape == (48, 8) and col_factor.shape == (8, 48)
    x = torch.randn(2, 5, layer.in_features)
    a = tt_weight(list(layer.loretta_rep_A["default"]), layer.in_features)  # in x r
    b = tt_weight(list(layer.loretta_rep_B["default"]), 8)  # r x out
    base = layer.get_base_layer()
    expected = base(x) + (16.0 / 8) * (x @ a @ b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert a.shape == (48, 8) and b.shape == (8, 48)


def test_parameter_count_per_768_layer_matches_the_paper():
    model = nn.Sequential(nn.Linear(768, 768))
    model = get_peft_model(model, LorettaRepConfig(target_modules=["0"], train_layernorms=False))
    assert model.get_nb_trainable_parameters()[0] == 1160  # LoRA r = 8 needs 12,288


def test_merge_and_unmerge_reproduce_the_adapter_output():
    inputs = token_batch()
    model = rep(tiny_bert(), task_type="SEQ_CLS", train_layernorms=False)
    train_steps(model, inputs)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, logits(tiny_bert(), inputs))
    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-4, atol=1e-5)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LorettaRepLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_several_adapters_switch_disable_and_delete():
    inputs = token_batch()
    base = logits(tiny_bert(), inputs)
    model = rep(tiny_bert(), task_type="SEQ_CLS", init="reference")
    first = logits(model, inputs)
    model.add_adapter("other", LorettaRepConfig(r=2, tensor_rank=2, task_type="SEQ_CLS", init="reference"))
    assert torch.equal(logits(model, inputs), first)  # adding does not activate
    model.set_adapter("other")
    other = logits(model, inputs)
    assert not torch.allclose(other, first)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), base)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, inputs), first)
    model.delete_adapter("other")
    assert all("other" not in layer.loretta_rep_A for layer in adapted_layers(model))


def test_trained_layernorms_are_saved_and_reloaded_in_a_fresh_process(tmp_path):
    inputs = token_batch()
    model = rep(tiny_bert(), task_type="SEQ_CLS")
    train_steps(model, inputs)
    norm = model.base_model.model.bert.encoder.layer[0].output.LayerNorm
    assert not torch.equal(norm.modules_to_save["default"].weight, norm.original_module.weight)
    trained = logits(model, inputs)
    torch.testing.assert_close(logits_after_reload(model, inputs, "tiny_bert", tmp_path), trained)
    # and without train_layernorms the norms are frozen and not saved
    frozen = rep(tiny_bert(), task_type="SEQ_CLS", train_layernorms=False)
    assert not any("LayerNorm" in n for n, p in frozen.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("selection", [r".*layer\.\d+\.output\.LayerNorm", ["layer.0.output.LayerNorm",
                                                                                "layer.1.output.LayerNorm"]])
def test_layernorm_modules_trains_and_saves_only_the_norms_it_selects(selection, tmp_path):
    inputs = token_batch()
    model = rep(tiny_bert(), task_type="SEQ_CLS", layernorm_modules=selection)
    trained_norms = {n.split(".modules_to_save")[0].removeprefix("base_model.model.")
                     for n, p in model.named_parameters() if p.requires_grad and "LayerNorm" in n}
    assert trained_norms == {"bert.encoder.layer.0.output.LayerNorm", "bert.encoder.layer.1.output.LayerNorm"}
    train_steps(model, inputs)
    trained = logits(model, inputs)
    torch.testing.assert_close(logits_after_reload(model, inputs, "tiny_bert", tmp_path), trained)


@pytest.mark.parametrize("selection", [["Norm"], "layer.0.LayerNorm", [], ["output.LayerNorm", 3]])
def test_layernorm_modules_that_select_no_norm_or_are_malformed_are_refused(selection):
    with pytest.raises(ValueError, match=r"(LoRETTA_rep|LorettaRepConfig): layernorm_modules=.*(matches none|is invalid)"):
        rep(tiny_bert(), task_type="SEQ_CLS", layernorm_modules=selection)


def test_layernorm_modules_without_trained_layernorms_is_refused():
    with pytest.raises(ValueError, match=r"LorettaRepConfig: layernorm_modules=.*but train_layernorms=False"):
        rep(tiny_bert(), task_type="SEQ_CLS", layernorm_modules=["LayerNorm"], train_layernorms=False)


def test_tensorised_roberta_head_is_trained_saved_and_reloaded(tmp_path):
    inputs = token_batch()
    model = rep(tiny_roberta(), task_type="SEQ_CLS", tensorised_head=True)
    head = model.base_model.model.classifier
    assert isinstance(head.dense, LorettaRepHead)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier.dense.loretta_rep_head" in n for n in trainable)
    assert any("classifier.out_proj.modules_to_save" in n for n in trainable)
    assert not any("classifier.dense.base_layer" in n or "classifier.modules_to_save" in n for n in trainable)
    train_steps(model, inputs)
    trained = logits(model, inputs)
    torch.testing.assert_close(logits_after_reload(model, inputs, "tiny_roberta", tmp_path), trained)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), logits(tiny_roberta(), inputs))


def test_tensorised_bert_head_replaces_the_pooler_and_merges():
    inputs = token_batch()
    model = rep(tiny_bert(), task_type="SEQ_CLS", tensorised_head=True, train_layernorms=False)
    pooler = model.base_model.model.bert.pooler.dense
    assert isinstance(pooler, LorettaRepHead)
    train_steps(model, inputs)
    adapted = logits(model, inputs)
    merged = model.merge_and_unload()
    assert isinstance(merged.bert.pooler.dense, nn.Linear)
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-4, atol=1e-5)


def test_bfloat16_base_follows_the_base_dtype():
    inputs = token_batch()
    base = tiny_bert().to(torch.bfloat16)
    model = rep(base, task_type="SEQ_CLS", init="reference")
    out = logits(model, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    reference = logits(rep(tiny_bert(), task_type="SEQ_CLS", init="reference"), inputs)
    assert out.shape == reference.shape


@pytest.mark.parametrize("kwargs, words", [
    ({"r": 0}, ["r=0", "int >= 1"]),
    ({"tensor_rank": -1}, ["tensor_rank=-1"]),
    ({"init": "lora"}, ["init='lora'", "'zero'", "'reference'"]),
    ({"dropout": 1.5}, ["dropout=1.5", "[0, 1)"]),
    ({"a_tensor_shape": [8, "x"]}, ["a_tensor_shape", "positive ints"]),
    ({"tensor_cores": 0}, ["tensor_cores=0", "int >= 1"]),
    ({"tensor_cores": "2"}, ["tensor_cores='2'", "int >= 1"]),
])
def test_bad_config_values_raise_clear_errors(kwargs, words):
    with pytest.raises(ValueError) as err:
        LorettaRepConfig(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_bad_shape_for_a_layer_names_the_module_value_and_what_is_valid():
    with pytest.raises(ValueError) as err:
        rep(tiny_bert(), task_type="SEQ_CLS", a_tensor_shape=[4, 4, 4])
    message = str(err.value)
    assert "query" in message and "a_tensor_shape=[4, 4, 4]" in message and str(32 * 4) in message


def test_tensorised_head_on_a_model_without_a_head_is_an_error():
    model = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="tensorised_head=True"):
        get_peft_model(model, LorettaRepConfig(target_modules=["0"], tensorised_head=True))


def test_loading_onto_a_base_of_other_sizes_names_the_module(tmp_path):
    model = rep(tiny_bert(hidden=32), task_type="SEQ_CLS", train_layernorms=False)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot load the adapter into"):
        PeftModel.from_pretrained(tiny_bert(hidden=48), tmp_path)


def test_any_width_including_primes():
    model = nn.Sequential(nn.Linear(1000, 4097), nn.Linear(4097, 7))
    with pytest.warns(UserWarning, match="prime"):
        model = get_peft_model(model, LorettaRepConfig(target_modules=["0", "1"], init="reference"))
    x = torch.randn(2, 1000)
    assert model(x).shape == (2, 7)
    layer = model.base_model.model[0]
    assert math.prod(p.shape[1] for p in layer.loretta_rep_A["default"]) == 1000 * 8


def test_layer_norm_names_select_only_norms():
    from ttpeft.tuners.loretta_common import layer_norm_save_names

    block = nn.Module()
    block.norm, block.prenorm = nn.LayerNorm(8), nn.Linear(8, 8)  # "norm" alone would also pick prenorm
    model = nn.Module()
    model.block, model.final_norm = block, nn.LayerNorm(8)
    assert layer_norm_save_names(model) == ["block.norm", "final_norm"]
    assert layer_norm_save_names(tiny_bert()) == ["LayerNorm"]
