"""Merge, unmerge and forward shared by layers whose update is ``h @ L @ R`` (TT-LoRA, LoRETTA_rep)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..contraction import add_factored_update
from .mixed_batch import BASE, row_groups


def quantisation(layer: nn.Module) -> Optional[str]:
    """``"8-bit"`` or ``"4-bit"`` for a bitsandbytes layer, else None (bitsandbytes is optional)."""
    if type(layer).__module__.split(".")[0] != "bitsandbytes":
        return None  # without importing bitsandbytes (slow) for every plain layer
    if is_bnb_available():
        import bitsandbytes as bnb

        if isinstance(layer, bnb.nn.Linear8bitLt):
            return "8-bit"
        if is_bnb_4bit_available() and isinstance(layer, bnb.nn.Linear4bit):
            return "4-bit"
    return None


def quantised_merge_error(module_name: str, kind: str) -> ValueError:
    return ValueError(
        f"cannot merge into {module_name!r}: its base layer is a bitsandbytes {kind} layer, and adding the update to "
        f"{kind} weights re-quantises them, so the merged model would not compute what the adapter does; keep the "
        "PeftModel (the update runs next to the quantised layer), or dequantise the base first (load it in "
        "float16/bfloat16/float32, then load the adapter and merge)"
    )


def check_merge_not_quantised(model: nn.Module) -> None:
    """For the tuners' ``_check_merge_allowed``: refuse before any layer is touched."""
    for key, module in model.named_modules():
        if isinstance(module, FactoredUpdateLinear) and module.quantisation is not None:
            raise quantised_merge_error(key, module.quantisation)


class FactoredUpdateLinear:
    """Mixed into an ``nn.Module`` + tuner-layer class that provides ``has_adapter(name)``,
    ``get_delta_weight(name)`` (``(out, in)``), ``adapter_dropout(name)``, ``contraction_strategy(name, h)``,
    ``factor_ref(name)`` and ``sequential_update(name, h)``, and sets ``module_name`` and ``quantisation``
    (of the base layer, see :func:`quantisation`)."""

    module_name: str = ""
    quantisation: Optional[str] = None

    def _weight_delta(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name)
        return (delta.T if self.fan_in_fan_out else delta).to(dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if self.quantisation is not None:
            raise quantised_merge_error(self.module_name, self.quantisation)
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

    def _add_update(self, adapter_name: str, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # In the output's dtype: the factors are thin, so casting them is cheap, unlike upcasting the
        # activations (under autocast the matmuls autocast anyway). On a quantised base the output's
        # dtype is only the compute dtype, so the update runs in the adapter's dtype, as peft's LoRA does.
        dtype = result.dtype
        if self.quantisation is not None and not torch.is_autocast_enabled(x.device.type):
            dtype = self.factor_ref(adapter_name).cores[0].dtype
        h = self.adapter_dropout(adapter_name)(x).to(dtype)
        return add_factored_update(
            result.to(dtype), h, self.contraction_strategy(adapter_name, h),
            lambda: self.factor_cache.factors(self.factor_ref(adapter_name)),
            lambda z: self.sequential_update(adapter_name, z)).to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if adapter_names is not None:
            return self._mixed_batch_forward(result, x, adapter_names)
        for adapter_name in self.active_adapters:
            if self.has_adapter(adapter_name):
                result = self._add_update(adapter_name, result, x)
        return result

    def _mixed_batch_forward(self, result: torch.Tensor, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """Row ``i`` gets adapter ``adapter_names[i]`` (none for ``"__base__"`` or an adapter this layer lacks)."""
        out = None
        for adapter_name, rows in row_groups(adapter_names, x.device):
            if adapter_name == BASE or not self.has_adapter(adapter_name):
                continue
            if out is None:
                out = result.clone()  # not in place: 4-bit bases return a tensor autograd may still need
            out[rows] = self._add_update(adapter_name, out[rows], x[rows])
        return result if out is None else out
