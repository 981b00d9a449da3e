import copy
import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import ttpeft
from ttpeft import TTLoraConfig
from ttpeft.tensor_train import contract_cores, tt_num_params
from ttpeft.tuners.ttlora import TTLoraLinear

from tiny_models import logits, mlp, tiny_bert, tiny_gpt2, token_batch

CASES = {
    "mlp": dict(build=mlp, targets=["lin0", "lin1"], save=["head"], inputs=lambda: torch.randn(5, 24)),
    "bert": dict(build=tiny_bert, targets=["query", "value"], save=["classifier"], inputs=token_batch),
    "gpt2": dict(build=tiny_gpt2, targets=["c_attn"], save=None, inputs=token_batch),
}


def adapted(case, seed=0, **config_kwargs):
    spec = CASES[case]
    config_kwargs.setdefault("tt_rank", 2)
    config = TTLoraConfig(target_modules=spec["targets"], modules_to_save=spec["save"], **config_kwargs)
    return get_peft_model(spec["build"](seed), config)


def train_steps(model, inputs, steps=5, lr=1e-2):
    """A few Adam steps pulling every output towards 1 (dropout off, so the loss is deterministic)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        out = model(input_ids=inputs).logits if inputs.dtype == torch.long else model(inputs)
        loss = (out.float() - 1).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


def test_zero_init_starts_at_the_base_model(case):
    spec = CASES[case]
    inputs = spec["inputs"]()
    base_out = logits(spec["build"](0), inputs)
    model = adapted(case)
    assert torch.allclose(logits(model, inputs), base_out, atol=1e-6)


def test_balanced_init_starts_at_the_base_model_in_another_gauge_of_the_same_cores():
    inputs = CASES["mlp"]["inputs"]()
    models = {}
    for init in ("zero", "balanced"):
        torch.manual_seed(1)
        models[init] = adapted("mlp", init=init, tt_rank=3)
    assert torch.allclose(logits(models["balanced"], inputs), logits(mlp(0), inputs), atol=1e-6)
    zero, balanced = (models[init].base_model.model.lin0.ttlora_cores["default"] for init in ("zero", "balanced"))
    scales = [float((b / z).flatten()[0]) for b, z in zip(balanced[:-1], zero[:-1])]
    assert max(scales) / min(scales) > 1.5  # rescaled by different factors, to the same product
    assert torch.allclose(contract_cores(list(balanced[:-1])), contract_cores(list(zero[:-1])), atol=1e-5)
    assert train_steps(models["balanced"], inputs)[-1] < train_steps(models["zero"], inputs, steps=1)[0]


def test_random_init_moves_away_from_the_base_model(case):
    spec = CASES[case]
    inputs = spec["inputs"]()
    base_out = logits(spec["build"](0), inputs)
    model = adapted(case, init="random")
    assert not torch.allclose(logits(model, inputs), base_out, atol=1e-6)


def test_only_adapter_and_saved_modules_train(case):
    model = adapted(case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert "ttlora_cores" in name or "modules_to_save" in name, name
    assert any("ttlora_cores" in n for n in trainable)
    expected_adapter = sum(p.numel() for m in model.modules() if isinstance(m, TTLoraLinear)
                           for p in m.ttlora_cores["default"].parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if "ttlora_cores" in n and p.requires_grad) \
        == expected_adapter


def test_training_changes_output_and_lowers_loss(case):
    spec = CASES[case]
    inputs = spec["inputs"]()
    model = adapted(case)
    before = logits(model, inputs)
    losses = train_steps(model, inputs)
    assert losses[-1] < losses[0]
    assert not torch.allclose(logits(model, inputs), before, atol=1e-5)


def test_merge_unmerge_and_unload(case):
    spec = CASES[case]
    inputs = spec["inputs"]()
    model = adapted(case, init="random")
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    unmerged = logits(model, inputs)
    model.merge_adapter()
    assert torch.allclose(logits(model, inputs), unmerged, atol=1e-5)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in base_weights:
            assert torch.allclose(param, base_weights[name], atol=1e-6), name
    assert torch.allclose(logits(model, inputs), unmerged, atol=1e-5)
    merged_model = model.merge_and_unload()
    assert not any(isinstance(m, TTLoraLinear) for m in merged_model.modules())
    assert torch.allclose(logits(merged_model, inputs), unmerged, atol=1e-5)


def test_disable_adapter_gives_the_base_output(case):
    spec = CASES[case]
    inputs = spec["inputs"]()
    base_out = logits(spec["build"](0), inputs)
    model = adapted(case, init="random")
    with model.disable_adapter():
        assert torch.allclose(logits(model, inputs), base_out, atol=1e-6)
    assert not torch.allclose(logits(model, inputs), base_out, atol=1e-6)


def test_save_and_load_round_trip(case, tmp_path):
    spec = CASES[case]
    inputs = spec["inputs"]()
    model = adapted(case)
    train_steps(model, inputs)
    trained = logits(model, inputs)
    model.save_pretrained(tmp_path)
    weights_file = tmp_path / "adapter_model.safetensors"
    assert weights_file.exists() and not (tmp_path / "adapter_model.bin").exists()
    saved = load_file(weights_file)
    adapter_params = sum(t.numel() for k, t in saved.items() if "ttlora_cores" in k)
    assert adapter_params == sum(p.numel() for n, p in model.named_parameters() if "ttlora_cores" in n)
    assert weights_file.stat().st_size < 4 * sum(t.numel() for t in saved.values()) + 4096
    loaded = PeftModel.from_pretrained(spec["build"](0), tmp_path)
    assert torch.allclose(logits(loaded, inputs), trained, atol=1e-6)


def test_two_adapters_switch(case):
    spec = CASES[case]
    inputs = spec["inputs"]()
    base_out = logits(spec["build"](0), inputs)
    model = adapted(case, init="random")
    first = logits(model, inputs)
    model.add_adapter("second", TTLoraConfig(target_modules=spec["targets"], tt_rank=3, init="random"))
    assert logits(model, inputs).allclose(first, atol=1e-6)  # adding does not activate
    model.set_adapter("second")
    second = logits(model, inputs)
    assert not second.allclose(first, atol=1e-5) and not second.allclose(base_out, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "ttlora" in n}
    assert trainable and all(".second." in n for n in trainable)
    model.set_adapter("default")
    assert logits(model, inputs).allclose(first, atol=1e-6)
    model.delete_adapter("second")
    assert not any("second" in n for n, _ in model.named_parameters())


def test_target_regex_all_linear_and_layers_to_transform():
    regex = get_peft_model(tiny_bert(), TTLoraConfig(target_modules=r".*layer\.1\.attention\.self\.(query|key)", tt_rank=2))
    names = {n for n, m in regex.named_modules() if isinstance(m, TTLoraLinear)}
    assert names and all("layer.1." in n and n.endswith(("query", "key")) for n in names) and len(names) == 2
    linear_names = {n for n, m in tiny_bert().named_modules() if isinstance(m, nn.Linear)}
    all_linear = get_peft_model(tiny_bert(), TTLoraConfig(target_modules="all-linear", tt_rank=2))
    adapted_names = {n.removeprefix("base_model.model.") for n, m in all_linear.named_modules()
                     if isinstance(m, TTLoraLinear)}
    assert adapted_names == linear_names and len(adapted_names) == 2 * 6 + 2  # 6 per layer, pooler, classifier
    layers = get_peft_model(tiny_bert(), TTLoraConfig(target_modules=["query"], layers_to_transform=[0], tt_rank=2))
    names = [n for n, m in layers.named_modules() if isinstance(m, TTLoraLinear)]
    assert len(names) == 1 and ".layer.0." in names[0]


def test_default_targets_follow_the_architecture():
    model = get_peft_model(tiny_bert(), TTLoraConfig(tt_rank=2))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, TTLoraLinear)}
    assert names == {"query", "value"}


def test_conv1d_layout_matches_linear_layout():
    model = adapted("gpt2", init="random")
    layer = next(m for m in model.modules() if isinstance(m, TTLoraLinear))
    assert isinstance(layer.get_base_layer(), Conv1D)
    x = torch.randn(2, 24)
    row_factor, col_factor = layer.adapter_factors("default")
    expected = layer.get_base_layer()(x) + layer.ttlora_alpha["default"] * (x @ row_factor @ col_factor)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_published_768_shape_has_990_parameters():
    layer = nn.Sequential(nn.Linear(768, 768))
    config = TTLoraConfig(target_modules=["0"], tt_shape=[[64, 4, 3], [3, 4, 64]], tt_rank=5)
    model = get_peft_model(layer, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 990
    shapes = [tuple(p.shape) for p in model.base_model.model[0].ttlora_cores["default"]]
    assert shapes == [(1, 64, 5), (5, 4, 5), (5, 3, 5), (5, 3, 5), (5, 4, 5), (5, 64, 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_its_dtype(dtype):
    model = get_peft_model(mlp().to(dtype), TTLoraConfig(target_modules=["lin0", "lin1"], tt_rank=2, init="random"))
    x = torch.randn(4, 24, dtype=dtype)
    out = model(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    cores = model.base_model.model.lin0.ttlora_cores["default"]
    assert cores[0].dtype == torch.float32 and cores[0].grad is not None  # peft keeps adapters in fp32


def test_autocast_forward_and_backward():
    model = get_peft_model(mlp(), TTLoraConfig(target_modules=["lin0", "lin1"], tt_rank=2, init="random"))
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.base_model.model.lin1.ttlora_cores["default"][-1].grad is not None
    reference = get_peft_model(mlp(), TTLoraConfig(target_modules=["lin0", "lin1"], tt_rank=2, init="random"))
    reference.load_state_dict(model.state_dict())
    assert torch.allclose(out.float(), reference(x), atol=0.1)


def test_forward_uses_thin_factors_not_a_dense_update(monkeypatch):
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64)), TTLoraConfig(target_modules=["0"], tt_rank=2))
    layer = model.base_model.model[0]
    monkeypatch.setattr(type(layer), "get_delta_weight", lambda *a: pytest.fail("dense ΔW built in forward"))
    model(torch.randn(3, 64)).sum().backward()


# Bad input ------------------------------------------------------------------------------------

def test_shape_product_mismatch_names_module_and_valid_sizes():
    with pytest.raises(ValueError, match=r"'lin0'.*\[4, 6\].*24 -> 36.*multiplying to 24"):
        get_peft_model(mlp(), TTLoraConfig(target_modules=["lin0"], tt_shape=[[4, 6], [6, 5]], tt_rank=2))


@pytest.mark.parametrize("rank", [0, -1, [2, 0, 2], 1.5, True])
def test_invalid_ranks_are_rejected(rank):
    with pytest.raises(ValueError, match="tt_rank"):
        TTLoraConfig(target_modules=["lin0"], tt_rank=rank)


def test_rank_larger_than_useful_is_rejected_not_truncated():
    config = TTLoraConfig(target_modules=["lin0"], tt_shape=[[2, 12], [6, 6]], tt_rank=4)
    with pytest.raises(ValueError, match=r"'lin0'.*bond 1.*at most 2"):
        get_peft_model(mlp(), config)


def test_unknown_target_module_is_an_error():
    with pytest.raises(ValueError, match="not_a_layer"):
        get_peft_model(mlp(), TTLoraConfig(target_modules=["not_a_layer"]))


def test_non_linear_target_is_an_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"'1'.*LayerNorm.*nn.Linear"):
        get_peft_model(model, TTLoraConfig(target_modules=["1"]))


@pytest.mark.parametrize("field,value", [("init", "gaussian"), ("dropout", 1.5), ("tt_shape", [[4, 6]]),
                                         ("tt_shape", [[4, 0], [6]]), ("factors_per_side", 0)])
def test_invalid_config_values(field, value):
    with pytest.raises(ValueError, match=field):
        TTLoraConfig(target_modules=["lin0"], **{field: value})


def test_loading_onto_a_base_with_other_sizes_is_a_clear_error(tmp_path):
    model = get_peft_model(mlp(), TTLoraConfig(target_modules=["lin0"], tt_rank=2))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'lin0'.*differ"):
        PeftModel.from_pretrained(mlp(hidden=48), tmp_path)


def test_saving_twice_keeps_separate_adapters(tmp_path):
    model = adapted("mlp", init="random")
    model.add_adapter("other", TTLoraConfig(target_modules=["lin0"], tt_rank=2, init="random"))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(mlp(), tmp_path / "other", adapter_name="other")
    copy_model = copy.deepcopy(model)
    copy_model.set_adapter("other")
    x = torch.randn(3, 24)
    assert torch.allclose(reloaded(x), copy_model(x), atol=1e-6)


# Registration and loading in fresh processes ---------------------------------------------------

def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_fresh_process_loads_a_saved_adapter(tmp_path):
    model = adapted("mlp", init="random")
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(7))
    torch.save({"x": x, "y": logits(model, x)}, tmp_path / "io.pt")
    result = run_python(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import ttpeft
        from peft import PeftModel
        from tiny_models import mlp
        io = torch.load("io.pt")
        model = PeftModel.from_pretrained(mlp(), "adapter")
        assert torch.allclose(model(io["x"]), io["y"], atol=1e-6)
        print("loaded", type(model.peft_config["default"]).__name__)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loaded TTLoraConfig" in result.stdout


def test_registration_is_idempotent_in_a_fresh_process(tmp_path):
    result = run_python("""
        import importlib
        import ttpeft
        import ttpeft.tuners.ttlora as ttlora
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
        from peft.utils import PeftType
        from ttpeft.registration import register_method
        register_method("ttlora", ttlora.TTLoraConfig, ttlora.TTLoraModel, "ttlora_")
        importlib.reload(ttlora)  # re-running the package's registration must not raise
        assert PeftType.TTLORA == "TTLORA" and PeftType("TTLORA") is PeftType.TTLORA
        assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.TTLORA] == "ttlora_"
        assert PEFT_TYPE_TO_TUNER_MAPPING["TTLORA"].__name__ == "TTLoraModel"
        assert list(PeftType).count(PeftType.TTLORA) == 1
        class Other(ttlora.TTLoraConfig):
            pass
        try:
            register_method("ttlora", Other, ttlora.TTLoraModel, "ttlora_")
        except ValueError as err:
            print("refused:", err)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refused: peft already has a method 'ttlora'" in result.stdout


def test_loading_without_importing_ttpeft_says_to_import_it(tmp_path):
    adapted("mlp").save_pretrained(tmp_path / "adapter")
    result = run_python(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from peft import PeftModel
        from tiny_models import mlp
        PeftModel.from_pretrained(mlp(), "adapter")
    """, tmp_path)
    assert result.returncode != 0
    assert "run `import ttpeft` before loading the adapter" in result.stderr
    assert "TtpeftNotImportedError" in result.stderr and "KeyError: 'TTLORA'" not in result.stderr


ENUM_CHECK = os.path.join(os.path.dirname(__file__), "enum_extension_check.py")


@pytest.mark.parametrize("version", ["3.10", "3.11", "3.12", "3.13"])
def test_enum_extension_on_each_python(version):
    candidates = [sys.executable] if sys.version.startswith(version + ".") else []
    candidates += [shutil.which(f"python{version}")] + sorted(glob.glob(os.path.expanduser(
        f"~/.pyenv/versions/{version}.*/bin/python")))
    working = [c for c in candidates if c and subprocess.run([c, "-c", "pass"], capture_output=True).returncode == 0]
    if not working:
        pytest.skip(f"python{version} is not installed here")
    interpreter = working[0]
    module = os.path.join(os.path.dirname(ttpeft.__file__), "enum_extension.py")
    result = subprocess.run([interpreter, ENUM_CHECK, module], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert " ok " in result.stdout


# Real model -------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_minilm_parameter_count_matches_the_tt_formula():
    from ttpeft.models import minilm_path
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    model = get_peft_model(base, TTLoraConfig(target_modules=["query", "value"], tt_rank=5))
    layers = [m for m in model.modules() if isinstance(m, TTLoraLinear)]
    assert len(layers) == 12 and all(m.in_features == m.out_features == 384 for m in layers)
    expected = sum(tt_num_params(m.ttlora_shape["default"][0] + m.ttlora_shape["default"][1], 5) for m in layers)
    adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "ttlora_cores" in n)
    assert adapter == expected == 12 * 640  # automatic shape (24, 4, 4 | 4, 4, 24)
