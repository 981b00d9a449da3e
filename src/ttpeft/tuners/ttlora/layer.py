"""TT-LoRA layers: ``y = W0 x + alpha * ΔW x`` with ΔW one tensor train per adapter."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...contraction import apply_sequential, choose_strategy
from ...factor_cache import FactorCache, TTFactorsRef, core_list, factor_dtype
from ...shapes import auto_ttlora_shape, check_ttlora_ranks, factorisation_note
from ...tt_matrix import init_tt_matrix_cores, thin_factors
from ..factored_linear import FactoredUpdateLinear, quantisation
from .config import TTLoraConfig


def base_layer_features(base_layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported base layer."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        weight = base_layer.weight
        in_features, out_features = weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape
        return in_features, out_features
    raise TypeError(f"unsupported layer type {type(base_layer).__name__}: TT-LoRA adapts nn.Linear and Conv1D")


class TTLoraLayer(BaseTunerLayer):
    """The adapter state shared by every TT-LoRA layer type."""

    adapter_layer_names = ("ttlora_cores",)
    other_param_names = ("ttlora_shape", "ttlora_alpha", "ttlora_dropout", "ttlora_contraction")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.ttlora_cores = nn.ModuleDict({})  # adapter -> nn.ParameterList of cores (r_{k-1}, n_k, r_k)
        self.ttlora_shape: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.ttlora_alpha: dict[str, float] = {}
        self.ttlora_dropout = nn.ModuleDict({})
        self.ttlora_contraction: dict[str, str] = {}
        self.factor_cache = FactorCache()
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = base_layer_features(self.get_base_layer())

    def resolve_shape(self, config: TTLoraConfig, module_name: str):
        if config.tt_shape is None:
            shape = auto_ttlora_shape(self.in_features, self.out_features, config.tt_rank, config.factors_per_side)
            for side, size in (("input", self.in_features), ("output", self.out_features)):
                note = factorisation_note(size, config.factors_per_side)
                if note:
                    warnings.warn(f"TT-LoRA on {module_name!r}: {side} features {note}.", stacklevel=4)
            return shape
        in_factors, out_factors = (tuple(side) for side in config.tt_shape)
        if math.prod(in_factors) != self.in_features or math.prod(out_factors) != self.out_features:
            raise ValueError(
                f"TT-LoRA on {module_name!r}: tt_shape {list(in_factors)} | {list(out_factors)} has products "
                f"{math.prod(in_factors)} -> {math.prod(out_factors)}, but the layer is {self.in_features} -> "
                f"{self.out_features}; valid tt_shape: input factors multiplying to {self.in_features} and output "
                f"factors multiplying to {self.out_features} (or tt_shape=None to derive one per layer)"
            )
        return in_factors, out_factors

    def update_layer(self, adapter_name: str, config: TTLoraConfig, module_name: str = "") -> None:
        in_factors, out_factors = self.resolve_shape(config, module_name)
        shape = in_factors + out_factors
        ranks = check_ttlora_ranks(shape, config.tt_rank, f"TT-LoRA on {module_name!r}")
        cores = init_tt_matrix_cores(shape, ranks, len(in_factors), zero_last=config.init in ("zero", "balanced"),
                                     balanced=config.init == "balanced")
        self.ttlora_cores[adapter_name] = nn.ParameterList([nn.Parameter(core) for core in cores])
        self.ttlora_shape[adapter_name] = (in_factors, out_factors)
        self.ttlora_alpha[adapter_name] = float(config.alpha)
        self.ttlora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.ttlora_contraction[adapter_name] = config.contraction
        self.factor_cache.entries.pop(adapter_name, None)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def adapter_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Thin factors ``A (in x r)`` and ``B (r x out)`` with ``ΔW^T = A @ B`` (float32, unscaled)."""
        cores = core_list(self.ttlora_cores[adapter_name])
        return thin_factors(cores, len(self.ttlora_shape[adapter_name][0]))

    def factor_ref(self, adapter_name: str) -> TTFactorsRef:
        """This adapter's factors for the cache: the train split at its middle bond; ``B`` comes scaled
        by alpha, both in the base layer's dtype."""
        cores = core_list(self.ttlora_cores[adapter_name])
        num_row_cores = len(self.ttlora_shape[adapter_name][0])
        out_dtype = factor_dtype(self, cores)
        return TTFactorsRef(self.factor_cache, adapter_name, cores[:num_row_cores], cores[num_row_cores:],
                            self.in_features, out_dtype, self.ttlora_alpha[adapter_name])

    def factor_refs_to_prepare(self, adapter_names: Optional[list[str]] = None) -> list[TTFactorsRef]:
        """Refs of the active adapters, or of ``adapter_names`` (those of a mixed-adapter batch)."""
        if self.disable_adapters or self.merged:
            return []
        return [self.factor_ref(name) for name in (self.active_adapters if adapter_names is None else adapter_names)
                if name in self.ttlora_cores and self.ttlora_contraction[name] != "sequential"]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``alpha * ΔW`` in ``(out, in)`` layout, in float32 at least."""
        row_factor, col_factor = self.adapter_factors(adapter_name)
        if row_factor.dtype in (torch.float16, torch.bfloat16):  # merge in fp32, cast by the caller
            row_factor, col_factor = row_factor.float(), col_factor.float()
        return self.ttlora_alpha[adapter_name] * (row_factor @ col_factor).T


class TTLoraLinear(FactoredUpdateLinear, nn.Module, TTLoraLayer):
    """TT-LoRA around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TTLoraConfig, module_name: str = "",
                 **kwargs) -> None:
        super().__init__()
        TTLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self.module_name = module_name
        self.quantisation = quantisation(self.get_base_layer())
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.ttlora_cores

    def adapter_dropout(self, adapter_name: str) -> nn.Module:
        return self.ttlora_dropout[adapter_name]

    def sequential_update(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``alpha * h @ ΔW^T`` pushing the activations through every core."""
        return self.ttlora_alpha[adapter_name] * apply_sequential(
            h, core_list(self.ttlora_cores[adapter_name]), len(self.ttlora_shape[adapter_name][0]))

    def contraction_strategy(self, adapter_name: str, h: torch.Tensor) -> str:
        strategy = self.ttlora_contraction[adapter_name]
        if strategy != "auto":
            return strategy
        cores = self.ttlora_cores[adapter_name]
        return choose_strategy([tuple(c.shape) for c in cores], len(self.ttlora_shape[adapter_name][0]),
                               h.numel() // h.shape[-1], h.device.type, h.element_size(),
                               factors_cached=not torch.is_grad_enabled())

    def __repr__(self) -> str:
        return "ttlora." + super().__repr__()
