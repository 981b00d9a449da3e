"""TT-LoRA and LoRETTA_rep on bitsandbytes 8-bit and 4-bit base layers (QLoRA style).

bitsandbytes is optional (``pip install ttpeft[quantised]``); these tests skip without it. Its CPU
backend is enough for them, so they run on a machine without a GPU too, e.g.::

    pip install --target /tmp/bnb-cpu --no-deps bitsandbytes
    PYTHONPATH=/tmp/bnb-cpu python3 -m pytest tests/test_quantised.py

and on CUDA where available (the ``cuda`` cases skip on CPU-only machines).
"""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from ttpeft import LorettaRepConfig, TTLoraConfig

from loretta_helpers import tiny_llama, token_batch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install ttpeft[quantised])")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
TARGETS = ["q_proj", "v_proj"]


def quantised_llama(kind: str, device: str, compute_dtype=torch.float32):
    """tiny_llama with its attention projections replaced by bitsandbytes layers (weights quantised on
    the move to ``device``, as ``from_pretrained(quantization_config=...)`` does). Width 128: the CPU
    backend's 4-bit kernels need input widths of at least one 64-value block."""
    model = tiny_llama(hidden=128)
    for name, module in list(model.model.layers.named_modules()):
        if not isinstance(module, nn.Linear) or ".self_attn." not in f".{name}":
            continue
        parent = model.model.layers.get_submodule(name.rsplit(".", 1)[0])
        weight = module.weight.data.clone()
        if kind == "8bit":
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False,
                                      compute_dtype=compute_dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        setattr(parent, name.rsplit(".", 1)[1], layer)
    return model.to(device).eval()


def config(method, **kwargs):
    if method == "ttlora":
        return TTLoraConfig(target_modules=TARGETS, tt_rank=2, init="random", **kwargs)
    return LorettaRepConfig(target_modules=TARGETS, tensor_rank=2, init="reference", train_layernorms=False, **kwargs)


def adapted_layers(model):
    return {key: m for key, m in model.named_modules() if hasattr(m, "quantisation") and hasattr(m, "base_layer")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
@pytest.mark.parametrize("method", ["ttlora", "loretta_rep"])
def test_wraps_quantised_layers_and_adds_the_update(method, kind, device):
    model = get_peft_model(quantised_llama(kind, device), config(method))
    layers = adapted_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    expected_cls = bnb.nn.Linear8bitLt if kind == "8bit" else bnb.nn.Linear4bit
    for layer in layers.values():
        base = layer.get_base_layer()
        assert isinstance(base, expected_cls)
        assert layer.quantisation == ("8-bit" if kind == "8bit" else "4-bit")
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
    layer = layers[next(k for k in layers if k.endswith("q_proj"))]
    x = torch.randn(2, 5, layer.in_features, device=device)
    with torch.no_grad():
        out = layer(x)
        base_out = layer.get_base_layer()(x)
        update = x @ layer.get_delta_weight(layer.active_adapters[0]).T.to(x.dtype)
    assert update.abs().max() > 1e-3
    torch.testing.assert_close(out, base_out + update, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_update_in_adapter_dtype_on_a_bf16_compute_base(device):
    """4-bit with bf16 compute: the base returns bf16, the float32 update is computed in float32 and
    the output keeps the base's dtype (as peft's LoRA on bitsandbytes layers)."""
    model = get_peft_model(quantised_llama("4bit", device, compute_dtype=torch.bfloat16), config("ttlora"))
    layer = next(iter(adapted_layers(model).values()))
    name = layer.active_adapters[0]
    assert layer.ttlora_cores[name][0].dtype == torch.float32
    x = torch.randn(3, layer.in_features, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        base_out = layer.get_base_layer()(x)
        update = x.float() @ layer.get_delta_weight(name).T
    assert base_out.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (base_out.float() + update).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
@pytest.mark.parametrize("method", ["ttlora", "loretta_rep"])
def test_trains_the_adapter_only(method, kind):
    model = get_peft_model(quantised_llama(kind, "cpu"), config(method))
    inputs = token_batch(batch=2, length=6)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f"{method}_" in n for n in trainable)  # the base's weights stay frozen
    model.train()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids=inputs, labels=inputs).loss
    loss.backward()
    optimiser.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
@pytest.mark.parametrize("method", ["ttlora", "loretta_rep"])
def test_merge_is_refused_and_the_model_keeps_working(method, kind):
    model = get_peft_model(quantised_llama(kind, "cpu"), config(method))
    inputs = token_batch(batch=2, length=6)
    with torch.no_grad():
        before = model(input_ids=inputs).logits
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match=r"cannot merge into 'model\.layers\.0\.self_attn\.q_proj'.*bitsandbytes "
                                             r"[48]-bit layer.*dequantise the base first"):
            merge()
    layer = next(iter(adapted_layers(model).values()))
    with pytest.raises(ValueError, match="dequantise the base first"):
        layer.merge()  # the layer refuses too, not only the model
    assert not layer.merged
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=inputs).logits, before)
    unloaded = model.unload()  # dropping the adapters is fine
    assert not adapted_layers(unloaded)


def test_mixed_batch_on_a_quantised_base():
    model = get_peft_model(quantised_llama("4bit", "cpu"), config("ttlora"), adapter_name="first")
    model.add_adapter("second", config("ttlora"))
    model.eval()
    inputs = token_batch(batch=3, length=6)
    names = ["second", "__base__", "first"]
    rows = []
    with torch.no_grad():
        for row, name in zip(inputs, names):
            if name == "__base__":
                with model.disable_adapter():
                    rows.append(model(input_ids=row[None]).logits)
            else:
                model.set_adapter(name)
                rows.append(model(input_ids=row[None]).logits)
        mixed = model(input_ids=inputs, adapter_names=names).logits
    torch.testing.assert_close(mixed, torch.cat(rows), rtol=1e-4, atol=1e-4)
