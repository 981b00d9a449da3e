"""LoRETTA_rep layers: ``y = W0 x + (alpha / r) * B A x`` with A and B tensor trains."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...contraction import apply_train_sequential
from ...factor_cache import FactorCache, TTFactorsRef, core_list, factor_dtype
from ...loretta_shapes import factor_shape
from ...shapes import factorisation_note
from ..loretta_common import (
    TensorisedHead,
    cores_reference,
    cores_with_entry_std,
    cores_zero_last,
    resolve_weight_shape,
    tt_params,
    tt_weight,
    uniform_ranks,
)
from ..factored_linear import FactoredUpdateLinear, quantisation
from ..ttlora.layer import base_layer_features
from .config import LorettaRepConfig


class LorettaRepLayer(BaseTunerLayer):
    """The adapter state shared by every LoRETTA_rep layer type.

    ``loretta_rep_A[adapter]`` holds the cores of A as an ``in x r`` matrix (the transpose of LoRA's
    ``r x in`` A, so that ``x @ A`` needs no transpose), ``loretta_rep_B[adapter]`` those of B as ``r x out``.
    """

    adapter_layer_names = ("loretta_rep_A", "loretta_rep_B")
    other_param_names = ("loretta_rep_r", "loretta_rep_scaling", "loretta_rep_dropout", "loretta_rep_contraction")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.loretta_rep_A = nn.ModuleDict({})
        self.loretta_rep_B = nn.ModuleDict({})
        self.loretta_rep_r: dict[str, int] = {}
        self.loretta_rep_scaling: dict[str, float] = {}
        self.loretta_rep_dropout = nn.ModuleDict({})
        self.loretta_rep_contraction: dict[str, str] = {}
        self.factor_cache = FactorCache()
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = base_layer_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: LorettaRepConfig, module_name: str = "") -> None:
        where = f"LoRETTA_rep on {module_name!r}"
        r = config.r
        for side, size, explicit in (("input", self.in_features, config.a_tensor_shape),
                                     ("output", self.out_features, config.b_tensor_shape)):
            note = factorisation_note(size, 2)
            if note and explicit is None:
                warnings.warn(f"{where}: {side} features {note}.", stacklevel=4)
        cores = config.tensor_cores
        a_shape = resolve_weight_shape(config.a_tensor_shape,
                                       factor_shape(self.in_features, r, width_first=True, cores=cores),
                                       self.in_features, r, where, "a_tensor_shape")
        b_shape = resolve_weight_shape(config.b_tensor_shape,
                                       factor_shape(self.out_features, r, width_first=False, cores=cores),
                                       r, self.out_features, where, "b_tensor_shape")
        a_ranks, b_ranks = uniform_ranks(a_shape, config.tensor_rank), uniform_ranks(b_shape, config.tensor_rank)
        if config.init == "reference":
            a_cores = cores_reference(a_shape, a_ranks, self.in_features, r)
            b_cores = cores_reference(b_shape, b_ranks, r, self.out_features)
        else:
            # LoRA's A is kaiming-uniform with a = sqrt(5): entries of variance 1 / (3 in).
            a_cores = cores_with_entry_std(a_shape, a_ranks, 1.0 / math.sqrt(3.0 * self.in_features))
            b_cores = cores_zero_last(b_shape, b_ranks)
        self.loretta_rep_A[adapter_name] = tt_params(a_cores)
        self.loretta_rep_B[adapter_name] = tt_params(b_cores)
        self.loretta_rep_r[adapter_name] = r
        self.loretta_rep_scaling[adapter_name] = float(config.lora_alpha) / r
        self.loretta_rep_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.loretta_rep_contraction[adapter_name] = config.contraction
        self.factor_cache.entries.pop(adapter_name, None)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def factor_ref(self, adapter_name: str) -> TTFactorsRef:
        """A (``in x r``) and B (``r x out``, scaled by ``alpha / r``) built from their trains, in the base
        layer's dtype: LoRA's two thin factors, so applying them costs what LoRA costs."""
        a_cores = core_list(self.loretta_rep_A[adapter_name])
        out_dtype = factor_dtype(self, a_cores)
        return TTFactorsRef(self.factor_cache, adapter_name, a_cores, core_list(self.loretta_rep_B[adapter_name]),
                            self.in_features, out_dtype, self.loretta_rep_scaling[adapter_name])

    def factor_refs_to_prepare(self, adapter_names: Optional[list[str]] = None) -> list[TTFactorsRef]:
        """Refs of the active adapters, or of ``adapter_names`` (those of a mixed-adapter batch)."""
        if self.disable_adapters or self.merged:
            return []
        return [self.factor_ref(name) for name in (self.active_adapters if adapter_names is None else adapter_names)
                if name in self.loretta_rep_A and self.loretta_rep_contraction[name] != "sequential"]

    def sequential_update(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``(alpha / r) * h @ A @ B`` pushing the activations through every core."""
        z = apply_train_sequential(h, core_list(self.loretta_rep_A[adapter_name]), self.in_features)
        z = apply_train_sequential(z, core_list(self.loretta_rep_B[adapter_name]), self.loretta_rep_r[adapter_name])
        return self.loretta_rep_scaling[adapter_name] * z

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(alpha / r) * B A`` in ``(out, in)`` layout, in float32 at least."""
        a = tt_weight(core_list(self.loretta_rep_A[adapter_name]), self.in_features)
        b = tt_weight(core_list(self.loretta_rep_B[adapter_name]), self.loretta_rep_r[adapter_name])
        if a.dtype in (torch.float16, torch.bfloat16):  # merge in fp32, cast by the caller
            a, b = a.float(), b.float()
        return self.loretta_rep_scaling[adapter_name] * (a @ b).T


class LorettaRepLinear(FactoredUpdateLinear, nn.Module, LorettaRepLayer):
    """LoRETTA_rep around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LorettaRepConfig, module_name: str = "",
                 **kwargs) -> None:
        super().__init__()
        LorettaRepLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self.module_name = module_name
        self.quantisation = quantisation(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.loretta_rep_A

    def adapter_dropout(self, adapter_name: str) -> nn.Module:
        return self.loretta_rep_dropout[adapter_name]

    def contraction_strategy(self, adapter_name: str, h: torch.Tensor) -> str:
        # A and B are thin by construction: the cost model's choice for them is always split.
        strategy = self.loretta_rep_contraction[adapter_name]
        return "split" if strategy == "auto" else strategy

    def __repr__(self) -> str:
        return "loretta_rep." + super().__repr__()


class LorettaRepHead(TensorisedHead, LorettaRepLayer):
    """The tensorised classifier head of a LoRETTA_rep adapter."""

    adapter_layer_names = ("loretta_rep_head", "loretta_rep_head_bias")
    other_param_names = ()
    head_attr = "loretta_rep_head"
    head_bias_attr = "loretta_rep_head_bias"

    def __repr__(self) -> str:
        return "loretta_rep_head." + super().__repr__()
