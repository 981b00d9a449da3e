"""Several adapters on one base: switching per request, and mixed-adapter batches
(``model(**batch, adapter_names=[...])`` and ``generate(..., adapter_names=[...])``) for every method."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from ttpeft import LorettaAdpConfig, LorettaRepConfig, TTLoraConfig
from ttpeft import factor_cache

from loretta_helpers import tiny_bert, tiny_llama, token_batch

NAMES = ("first", "second")  # not contained in any method's prefix (peft warns about those)
PREFIXES = ("ttlora_", "loretta_rep_", "loretta_adp_", "modules_to_save")


def bert_config(method, **kwargs):
    if method == "ttlora":
        return TTLoraConfig(target_modules=["query", "value"], tt_rank=2, modules_to_save=["classifier"], **kwargs)
    if method == "loretta_rep":
        # layer norms (modules_to_save copies) and a tensorised head: every per-adapter module type
        return LorettaRepConfig(target_modules=["query", "value"], tensor_rank=2, task_type="SEQ_CLS",
                                tensorised_head=True, **kwargs)
    return LorettaAdpConfig(tensor_rank=2, bottleneck_size=4, task_type="SEQ_CLS", **kwargs)


def llama_config(method):
    if method == "ttlora":
        return TTLoraConfig(tt_rank=2, task_type="CAUSAL_LM")
    if method == "loretta_rep":
        return LorettaRepConfig(tensor_rank=2, task_type="CAUSAL_LM")
    return LorettaAdpConfig(tensor_rank=2, bottleneck_size=4, task_type="CAUSAL_LM")


def randomise(model, seed):
    """Move the active adapter's parameters away from their (zero-update) initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and any(p in name for p in PREFIXES):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def two_adapters(build, config):
    model = get_peft_model(build(), config(), adapter_name=NAMES[0])
    model.add_adapter(NAMES[1], config())
    for seed, name in enumerate(NAMES):
        model.set_adapter(name)
        randomise(model, seed)
    model.set_adapter(NAMES[0])
    return model.eval()


def per_row(model, run, inputs, names):
    """``run(model, row)`` for each row alone, under its adapter (``__base__``: adapters disabled)."""
    outputs = []
    active = model.active_adapter
    for row, name in zip(inputs, names):
        if name == "__base__":
            with model.disable_adapter():
                outputs.append(run(model, row[None]))
        else:
            model.set_adapter(name)
            outputs.append(run(model, row[None]))
    model.set_adapter(active)
    return torch.cat(outputs)


def logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(input_ids=inputs, **kwargs).logits


@pytest.mark.parametrize("method", ["ttlora", "loretta_rep", "loretta_adp"])
def test_mixed_batch_matches_each_row_alone(method, monkeypatch):
    model = two_adapters(tiny_bert, lambda: bert_config(method))
    names = ["first", "second", "__base__", "second", "first"]
    inputs = token_batch(batch=len(names))
    expected = per_row(model, logits, inputs, names)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the adapters differ, from each other and the base
    assert (expected[1] - expected[2]).abs().max() > 1e-3

    # Grouped factors: the model's pre-forward hook builds every named adapter's factors, not only the
    # active one's, so no layer has to build its own during the forward.
    built_alone = []
    build_factors = factor_cache.build_factors
    monkeypatch.setattr(factor_cache, "build_factors", lambda ref: built_alone.append(ref) or build_factors(ref))
    for layer in model.modules():
        if hasattr(layer, "factor_cache"):
            layer.factor_cache.clear()
    mixed = logits(model, inputs, adapter_names=names)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    assert built_alone == []

    # The hooks are gone afterwards: a plain forward uses the active adapter for every row.
    assert model.active_adapter == "first"
    torch.testing.assert_close(logits(model, inputs), per_row(model, logits, inputs, ["first"] * len(names)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("contraction", ["sequential", "reconstruct", "auto"])
def test_mixed_batch_with_each_contraction(contraction):
    model = two_adapters(tiny_bert, lambda: bert_config("ttlora", contraction=contraction))
    names = ["second", "__base__", "first"]
    inputs = token_batch(batch=3)
    torch.testing.assert_close(logits(model, inputs, adapter_names=names), per_row(model, logits, inputs, names),
                               rtol=1e-5, atol=1e-5)


def test_mixed_batch_without_grouped_factors():
    model = two_adapters(tiny_bert, lambda: bert_config("loretta_rep"))
    model.base_model.group_factors = False  # each layer builds the factors of the adapters its rows use
    names = ["second", "first", "__base__"]
    inputs = token_batch(batch=3)
    torch.testing.assert_close(logits(model, inputs, adapter_names=names), per_row(model, logits, inputs, names),
                               rtol=1e-5, atol=1e-5)


def greedy(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=5,
                              do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("method", ["ttlora", "loretta_rep", "loretta_adp"])
def test_generate_with_adapter_names_matches_each_row(method):
    model = two_adapters(tiny_llama, lambda: llama_config(method))
    names = ["second", "__base__", "first"]
    inputs = token_batch(batch=3, length=6)
    expected = per_row(model, greedy, inputs, names)
    assert len({tuple(row[6:].tolist()) for row in expected}) > 1  # the adapters change what is generated
    assert torch.equal(greedy(model, inputs, adapter_names=names), expected)


def test_generate_with_beams_repeats_the_names():
    model = two_adapters(tiny_llama, lambda: llama_config("ttlora"))
    names = ["first", "second"]
    inputs = token_batch(batch=2, length=6)
    expected = per_row(model, lambda m, row: greedy(m, row, num_beams=2), inputs, names)
    assert torch.equal(greedy(model, inputs, adapter_names=names, num_beams=2), expected)


def test_unknown_adapter_name_is_named():
    model = two_adapters(tiny_bert, lambda: bert_config("ttlora"))
    with pytest.raises(ValueError, match=r"\['thrid'\].*loaded adapters: \['first', 'second'\]"):
        logits(model, token_batch(batch=2), adapter_names=["first", "thrid"])


def test_length_mismatch_names_the_layer():
    model = two_adapters(tiny_bert, lambda: bert_config("ttlora"))
    with pytest.raises(ValueError, match=r"layer '.*query'.*3 entries but the batch has 2 rows"):
        logits(model, token_batch(batch=2), adapter_names=["first", "second", "first"])
    logits(model, token_batch(batch=2))  # the hooks were removed despite the error


def test_refused_in_training_mode():
    model = two_adapters(tiny_bert, lambda: bert_config("loretta_adp"))
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=token_batch(batch=2), adapter_names=["first", "second"])


def test_refused_with_merged_adapters():
    model = two_adapters(tiny_bert, lambda: bert_config("ttlora"))
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"merged \(layer '.*' holds \['first'\]\).*unmerge_adapter"):
        logits(model, token_batch(batch=2), adapter_names=["first", "second"])
    model.unmerge_adapter()
    names = ["second", "first"]
    inputs = token_batch(batch=2)
    torch.testing.assert_close(logits(model, inputs, adapter_names=names), per_row(model, logits, inputs, names),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ttlora", "loretta_rep", "loretta_adp"])
def test_switching_between_loaded_adapters(method, tmp_path):
    """Adapters saved separately, loaded onto one base, served one request at a time with set_adapter."""
    model = two_adapters(tiny_bert, lambda: bert_config(method))
    inputs = token_batch(batch=3)
    expected = {}
    for name in NAMES:
        model.set_adapter(name)
        expected[name] = logits(model, inputs)
    model.save_pretrained(tmp_path)  # one folder per adapter (not "default"): tmp_path/first, tmp_path/second

    served = PeftModel.from_pretrained(tiny_bert(), tmp_path / "first", adapter_name="first")
    served.load_adapter(tmp_path / "second", adapter_name="second")
    served.eval()
    for name in ["second", "first", "second", "first"]:
        served.set_adapter(name)
        torch.testing.assert_close(logits(served, inputs), expected[name], rtol=1e-5, atol=1e-5)
    names = ["second", "first", "__base__"]
    torch.testing.assert_close(logits(served, inputs, adapter_names=names),
                               torch.cat([expected["second"][:1], expected["first"][1:2],
                                          per_row(served, logits, inputs[2:], ["__base__"])]), rtol=1e-5, atol=1e-5)


def test_switching_keeps_only_the_factors_in_use():
    """With many adapters loaded, each layer caches the factors of the adapters the last forward used."""
    model = two_adapters(tiny_bert, lambda: bert_config("ttlora"))
    model.add_adapter("third", bert_config("ttlora"))
    inputs = token_batch(batch=2)
    layers = [m for m in model.modules() if hasattr(m, "factor_cache")]
    for name in ["first", "second", "third", "first"]:
        model.set_adapter(name)
        expected = logits(model, inputs)
        assert all(set(layer.factor_cache.entries) == {name} for layer in layers)
        torch.testing.assert_close(logits(model, inputs), expected)  # served from the cache
    logits(model, inputs, adapter_names=["third", "second"])
    assert all(set(layer.factor_cache.entries) == {"second", "third"} for layer in layers)
