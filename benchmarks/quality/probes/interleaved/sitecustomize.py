"""Probe, not a feature: TT-LoRA with the interleaved TT-matrix layout.

Each core carries one input and one output factor, ``G_k (r_{k-1}, p_k * q_k, r_k)``, so ΔW is a sum of
Kronecker-structured terms (full rank is possible, as with LoKr) instead of the split layout's rank-r
product of an input-side and an output-side train. Loaded at interpreter start when this folder is on
``PYTHONPATH`` and ``TTPEFT_PROBE_INTERLEAVED="p_1,..,p_d|q_1,..,q_d|r_1,..,r_{d-1}"`` is set; it replaces
the cores of every TT-LoRA layer (the saved config still describes the split layout, so such an adapter
cannot be reloaded). README, "Ablations on the held-out slice".
"""

import math
import os

_SPEC = os.environ.get("TTPEFT_PROBE_INTERLEAVED")

if _SPEC:
    import torch
    from torch import nn

    from ttpeft.tensor_train import contract_cores
    from ttpeft.tuners.ttlora import layer as ttlora_layer

    _in_text, _out_text, _rank_text = _SPEC.split("|")
    IN_FACTORS = [int(v) for v in _in_text.split(",")]
    OUT_FACTORS = [int(v) for v in _out_text.split(",")]
    RANKS = [1, *(int(v) for v in _rank_text.split(",")), 1]
    NUM_CORES = len(IN_FACTORS)
    _generator = torch.Generator().manual_seed(0)
    _split_update_layer = ttlora_layer.TTLoraLayer.update_layer

    def update_layer(self, adapter_name, config, module_name=""):
        _split_update_layer(self, adapter_name, config, module_name)
        if math.prod(IN_FACTORS) != self.in_features or math.prod(OUT_FACTORS) != self.out_features:
            raise ValueError(f"{module_name!r}: {_SPEC!r} does not fit {self.in_features} -> {self.out_features}")
        # Last core zero (ΔW = 0); the product of the others has LoKr-like entries, variance 1 / (3 fan_in).
        prefix_var = 1.0 / (3.0 * (self.in_features // IN_FACTORS[-1]))
        std = (prefix_var / math.prod(RANKS[1:NUM_CORES - 1])) ** (1.0 / (2 * (NUM_CORES - 1)))
        cores = [torch.randn(RANKS[k], IN_FACTORS[k] * OUT_FACTORS[k], RANKS[k + 1], generator=_generator) * std
                 for k in range(NUM_CORES)]
        cores[-1].zero_()
        device = self.get_base_layer().weight.device
        self.ttlora_cores[adapter_name] = nn.ParameterList([nn.Parameter(core.to(device)) for core in cores])
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def dense_update(self, adapter_name):
        """ΔW^T as ``(in, out)``, unscaled: modes ``(p_1 q_1, .., p_d q_d)`` reordered to ``(p.., q..)``."""
        full = contract_cores(list(self.ttlora_cores[adapter_name]))
        full = full.reshape([n for k in range(NUM_CORES) for n in (IN_FACTORS[k], OUT_FACTORS[k])])
        order = list(range(0, 2 * NUM_CORES, 2)) + list(range(1, 2 * NUM_CORES, 2))
        return full.permute(order).reshape(self.in_features, self.out_features)

    def get_delta_weight(self, adapter_name):
        return self.ttlora_alpha[adapter_name] * dense_update(self, adapter_name).float().T

    def add_update(self, adapter_name, result, x):
        h = self.adapter_dropout(adapter_name)(x).to(result.dtype)
        return result + h @ (self.ttlora_alpha[adapter_name] * dense_update(self, adapter_name)).to(result.dtype)

    ttlora_layer.TTLoraLayer.update_layer = update_layer
    ttlora_layer.TTLoraLayer.get_delta_weight = get_delta_weight
    ttlora_layer.TTLoraLayer.factor_refs_to_prepare = lambda self, adapter_names=None: []  # no split factors
    ttlora_layer.TTLoraLinear._add_update = add_update
