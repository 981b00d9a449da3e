"""Merge, unmerge and forward shared by layers whose update is ``h @ L @ R`` (TT-LoRA, LoRETTA_rep)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge

from ..contraction import add_factored_update


class FactoredUpdateLinear:
    """Mixed into an ``nn.Module`` + tuner-layer class that provides ``has_adapter(name)``,
    ``get_delta_weight(name)`` (``(out, in)``), ``adapter_dropout(name)``, ``contraction_strategy(name, h)``,
    ``factor_ref(name)`` and ``sequential_update(name, h)``."""

    def _weight_delta(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name)
        return (delta.T if self.fan_in_fan_out else delta).to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        base_layer = self.get_base_layer()
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if not self.has_adapter(adapter_name):
                continue
            delta = self._weight_delta(adapter_name, base_layer.weight.dtype)
            if safe_merge:
                merged = base_layer.weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights: adapter {adapter_name!r} seems broken")
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if self.has_adapter(adapter_name):
                base_layer.weight.data -= self._weight_delta(adapter_name, base_layer.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.active_adapters:
            if not self.has_adapter(adapter_name):
                continue
            # In the output's dtype: the factors are thin, so casting them is cheap, unlike upcasting
            # the activations (under autocast the matmuls autocast anyway).
            h = self.adapter_dropout(adapter_name)(x).to(result.dtype)
            result = add_factored_update(
                result, h, self.contraction_strategy(adapter_name, h),
                lambda: self.factor_cache.factors(self.factor_ref(adapter_name)),
                lambda z: self.sequential_update(adapter_name, z))
        return result
