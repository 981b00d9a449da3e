import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ttpeft import LorettaAdpConfig, LorettaRepConfig, TTLoraConfig
from ttpeft import factor_cache as factor_cache_module
from ttpeft.contraction import STRATEGIES, apply_sequential, choose_strategy, strategy_costs
from ttpeft.tensor_train import TensorTrain
from ttpeft.tt_matrix import tt_matrix_dense
from ttpeft.tuners.ttlora import TTLoraLinear

from tiny_models import mlp, tiny_bert, token_batch


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("num_row_cores", [1, 2, 3])
def test_sequential_matches_the_dense_matrix(num_row_cores):
    tt = TensorTrain.random((4, 3, 2, 5), [3, 2, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shape = tt.shape
    rows = 1
    for n in shape[:num_row_cores]:
        rows *= n
    x = torch.randn(2, 3, rows, dtype=torch.float64)
    expected = x @ tt_matrix_dense(tt.cores, num_row_cores)
    assert torch.allclose(apply_sequential(x, tt.cores, num_row_cores), expected)


def method_config(method, strategy):
    if method == "ttlora":
        return TTLoraConfig(target_modules=["query", "value", "dense"], tt_rank=3, init="random", contraction=strategy)
    if method == "loretta_rep":
        return LorettaRepConfig(target_modules=["query", "value", "dense"], r=4, tensor_rank=3, init="reference",
                                contraction=strategy)
    return LorettaAdpConfig(bottleneck_size=8, tensor_rank=3, init="reference", contraction=strategy)


def strategy_model(strategy, group=True, method="ttlora"):
    model = get_peft_model(tiny_bert(), method_config(method, strategy))
    model.base_model.group_factors = group
    return model


def outputs_and_grads(model, inputs):
    out = model(input_ids=inputs).logits
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("method", ["ttlora", "loretta_rep", "loretta_adp"])
@pytest.mark.parametrize("strategy,group", [("reconstruct", True), ("sequential", True), ("auto", True),
                                            ("split", False)])
def test_every_strategy_gives_the_same_outputs_and_gradients(method, strategy, group):
    inputs = token_batch()
    reference_out, reference_grads = outputs_and_grads(strategy_model("split", method=method), inputs)
    out, grads = outputs_and_grads(strategy_model(strategy, group, method), inputs)
    assert torch.allclose(out, reference_out, atol=1e-5)
    assert grads.keys() == reference_grads.keys() and any(method in k for k in grads)
    for name in grads:
        assert torch.allclose(grads[name], reference_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("method", ["ttlora", "loretta_rep", "loretta_adp"])
def test_grouped_build_uses_one_group_per_shape(monkeypatch, method):
    groups = []
    original = factor_cache_module.build_grouped
    monkeypatch.setattr(factor_cache_module, "build_grouped", lambda refs: groups.append(original(refs)) or groups[-1])
    model = strategy_model("split", method=method)
    model(input_ids=token_batch())
    refs = [ref for m in model.modules() if hasattr(m, "factor_cache") for ref in m.factor_refs_to_prepare()]
    shapes = {tuple(tuple(c.shape) for c in ref.cores) for ref in refs}
    assert groups == [len(shapes)] and len(refs) > len(shapes)


def count_factor_builds(monkeypatch):
    calls = []
    original = factor_cache_module.build_factors
    monkeypatch.setattr(factor_cache_module, "build_factors", lambda *a: calls.append(1) or original(*a))
    original_chain = factor_cache_module._stacked_chain
    monkeypatch.setattr(factor_cache_module, "_stacked_chain", lambda s: calls.append(1) or original_chain(s))
    return calls


def test_eval_caches_factors_and_rebuilds_after_an_optimiser_step(monkeypatch):
    model = strategy_model("split")
    inputs = token_batch()
    calls = count_factor_builds(monkeypatch)
    model.eval()
    with torch.no_grad():
        first = model(input_ids=inputs).logits
        built = len(calls)
        again = model(input_ids=inputs).logits
    assert built > 0 and len(calls) == built and torch.equal(first, again)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=inputs).logits.pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after_step = model(input_ids=inputs).logits
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if isinstance(m, TTLoraLinear):
            m.factor_cache.clear()
    with torch.no_grad():
        assert not torch.allclose(after_step, first)
        assert torch.allclose(after_step, fresh(input_ids=inputs).logits, atol=1e-6)


def test_load_state_dict_invalidates_cached_factors():
    model, other = strategy_model("split"), strategy_model("split")
    for p in other.parameters():
        if p.requires_grad:
            nn.init.normal_(p)
    inputs = token_batch()
    model.eval(), other.eval()
    with torch.no_grad():
        before = model(input_ids=inputs).logits
        model.load_state_dict(other.state_dict())
        after = model(input_ids=inputs).logits
        assert not torch.allclose(before, after)
        assert torch.allclose(after, other(input_ids=inputs).logits, atol=1e-6)


def test_direct_layer_calls_without_the_model_hook_stay_correct():
    model = get_peft_model(mlp(), TTLoraConfig(target_modules=["lin0"], tt_rank=2, init="random"))
    layer = model.base_model.model.lin0
    x = torch.randn(3, 24)
    with torch.no_grad():
        first = layer(x)
        for core in layer.ttlora_cores["default"]:
            core.mul_(2.0)
        assert not torch.allclose(layer(x), first)


def test_gradient_accumulation_over_several_forwards():
    model = strategy_model("split")
    inputs = token_batch()
    for _ in range(2):  # two micro-batches before one step: the second forward must not reuse freed graphs
        model(input_ids=inputs).logits.pow(2).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "ttlora_cores" in n]
    single = strategy_model("split")
    single(input_ids=inputs).logits.pow(2).sum().backward()
    single_grads = [p.grad for n, p in single.named_parameters() if "ttlora_cores" in n]
    assert all(torch.allclose(g, 2 * s, atol=1e-5) for g, s in zip(grads, single_grads))


@pytest.mark.parametrize("strategy", ["split", "sequential"])
def test_gradient_checkpointing_matches_plain_training(strategy):
    inputs = token_batch()
    config = TTLoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], tt_rank=3, init="random",
                          contraction=strategy)
    plain = get_peft_model(tiny_llama(), config)
    checkpointed = get_peft_model(tiny_llama(), copy.deepcopy(config))
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.train(), plain.train()
    losses = []
    for model in (plain, checkpointed):
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    for name, param in checkpointed.named_parameters():
        if name in plain_grads:
            assert torch.allclose(param.grad, plain_grads[name], atol=1e-5), name
    assert any("ttlora_cores" in n for n in plain_grads)


def test_generation_uses_and_refreshes_the_cache():
    model = get_peft_model(tiny_llama(), TTLoraConfig(target_modules=["q_proj", "v_proj"], tt_rank=3, init="random"))
    model.eval()
    prompt = token_batch(batch=1, length=4)
    tokens = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    merged = copy.deepcopy(model).merge_and_unload()
    assert torch.equal(tokens, merged.generate(input_ids=prompt, max_new_tokens=5, do_sample=False))


def test_cost_model_prefers_split_for_many_tokens_and_is_monotone():
    shape = [(1, 16, 8), (8, 16, 8), (8, 16, 8), (8, 16, 8), (8, 16, 8), (8, 16, 1)]
    assert choose_strategy(shape, 3, 16384, "cuda") == "split"
    small, large = strategy_costs(shape, 3, 128), strategy_costs(shape, 3, 16384)
    assert all(large[s] > small[s] for s in STRATEGIES)
    # reconstruct adds a dense in x out GEMM per token: far more work than two thin GEMMs
    assert large["reconstruct"] > 10 * large["split"]
    cached = strategy_costs(shape, 3, 1, factors_cached=True)
    assert cached["split"] < strategy_costs(shape, 3, 1)["split"]


def test_invalid_contraction_is_rejected():
    with pytest.raises(ValueError, match="contraction"):
        TTLoraConfig(target_modules=["lin0"], contraction="fast")


@pytest.mark.slow
def test_torch_compile_of_an_adapted_model():
    model = get_peft_model(mlp(), TTLoraConfig(target_modules=["lin0", "lin1"], tt_rank=2, init="random"))
    x = torch.randn(4, 24)
    expected = model(x)
    compiled = torch.compile(model)
    out = compiled(x)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert model.base_model.model.lin0.ttlora_cores["default"][0].grad is not None
    # the factor cache stays out of traced graphs: one graph, no breaks, no recompilation per layer
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
