"""LoRETTA_adp layers: a tensorised bottleneck adapter on a layer's input or output, or beside it."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from ...contraction import apply_train_sequential
from ...factor_cache import FactorCache, TTFactorsRef, core_list, factor_dtype
from ...loretta_shapes import factor_shape
from ...shapes import factorisation_note
from ...tensor_train import frobenius_norm
from ..loretta_common import (
    TensorisedHead,
    cores_reference,
    cores_with_entry_std,
    cores_zero_last,
    resolve_weight_shape,
    tt_params,
    uniform_ranks,
)
from ..mixed_batch import row_groups
from ..ttlora.layer import base_layer_features
from .config import LorettaAdpConfig, adapter_widths

PLACEMENTS = ("input", "output", "parallel")


def merge_error(adapter_names) -> ValueError:
    return ValueError(
        f"LoRETTA_adp adapters {list(adapter_names)} cannot be merged into the base weights: the adapter "
        "h + s * up(act(down(h))) has a non-linearity, so it is not a change of the layer's weight. Keep the "
        "PeftModel for inference, or use unload() to drop the adapters."
    )


class LorettaAdpLayer(BaseTunerLayer):
    """The adapter state shared by every LoRETTA_adp layer type.

    ``down`` is held as an ``h x m`` matrix and ``up`` as ``m x h'`` (``x @ W`` layout): ``h = h'`` is the
    layer's input features (input adapter) or output features (output adapter); a parallel adapter maps
    the input features ``h`` to the output features ``h'``.
    """

    adapter_layer_names = ("loretta_adp_down", "loretta_adp_up", "loretta_adp_down_bias", "loretta_adp_up_bias",
                           "loretta_adp_scale", "loretta_adp_gain")
    other_param_names = ("loretta_adp_placement", "loretta_adp_width", "loretta_adp_fixed_scale",
                         "loretta_adp_act", "loretta_adp_dropout", "loretta_adp_contraction",
                         "loretta_adp_normalize_input")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.loretta_adp_down = nn.ModuleDict({})
        self.loretta_adp_up = nn.ModuleDict({})
        self.loretta_adp_down_bias = nn.ParameterDict({})
        self.loretta_adp_up_bias = nn.ParameterDict({})
        self.loretta_adp_scale = nn.ParameterDict({})  # only for scaling="learned"
        self.loretta_adp_gain = nn.ParameterDict({})  # only for weight_norm: up's gain
        self.loretta_adp_placement: dict[str, str] = {}
        self.loretta_adp_width: dict[str, int] = {}
        self.loretta_adp_fixed_scale: dict[str, float] = {}
        self.loretta_adp_act = nn.ModuleDict({})
        self.loretta_adp_dropout = nn.ModuleDict({})
        self.loretta_adp_contraction: dict[str, str] = {}
        self.loretta_adp_normalize_input: dict[str, bool] = {}
        self.factor_cache = FactorCache()
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.in_features, self.out_features = base_layer_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: LorettaAdpConfig, module_name: str = "",
                     placement: str = "output") -> None:
        where = f"LoRETTA_adp on {module_name!r}"
        if placement not in PLACEMENTS:
            raise ValueError(f"{where}: placement={placement!r} is invalid; valid: {PLACEMENTS}")
        width, up_width = adapter_widths(placement, self.in_features, self.out_features)
        m = config.bottleneck_size
        for features in sorted({width, up_width}):
            note = factorisation_note(features, 2)
            if note and (config.down_tensor_shape is None or config.up_tensor_shape is None):
                warnings.warn(f"{where}: adapter width {note}.", stacklevel=4)
        cores = config.tensor_cores
        down_shape = resolve_weight_shape(config.down_tensor_shape, factor_shape(width, m, True, cores=cores),
                                          width, m, where, "down_tensor_shape")
        up_shape = resolve_weight_shape(config.up_tensor_shape, factor_shape(up_width, m, False, cores=cores),
                                        m, up_width, where, "up_tensor_shape")
        down_ranks, up_ranks = uniform_ranks(down_shape, config.tensor_rank), uniform_ranks(up_shape, config.tensor_rank)
        if config.init == "reference":
            down_cores = cores_reference(down_shape, down_ranks, width, m)
            up_cores = cores_reference(up_shape, up_ranks, m, up_width)
            # nn.Linear's default bias init, as the published code's tensorised layers.
            down_bias = torch.empty(m).uniform_(-1 / math.sqrt(m), 1 / math.sqrt(m))
            up_bias = torch.empty(up_width).uniform_(-1 / math.sqrt(up_width), 1 / math.sqrt(up_width))
        else:
            down_cores = cores_with_entry_std(down_shape, down_ranks, 1.0 / math.sqrt(3.0 * width))
            # weight_norm: the gain starts at 0, and up needs a direction (a zero core has none)
            up_cores = (cores_with_entry_std(up_shape, up_ranks, 1.0 / math.sqrt(3.0 * m)) if config.weight_norm
                        else cores_zero_last(up_shape, up_ranks))
            down_bias, up_bias = torch.zeros(m), torch.zeros(up_width)
        self.loretta_adp_down[adapter_name] = tt_params(down_cores)
        self.loretta_adp_up[adapter_name] = tt_params(up_cores)
        if config.adapter_bias:
            self.loretta_adp_down_bias[adapter_name] = nn.Parameter(down_bias)
            self.loretta_adp_up_bias[adapter_name] = nn.Parameter(up_bias)
        if config.weight_norm:
            self.loretta_adp_gain[adapter_name] = nn.Parameter(torch.zeros(1))
        elif adapter_name in self.loretta_adp_gain:  # re-added without it
            del self.loretta_adp_gain[adapter_name]
        if config.scaling == "learned":
            self.loretta_adp_scale[adapter_name] = nn.Parameter(torch.ones(1))
        else:
            self.loretta_adp_fixed_scale[adapter_name] = float(config.scaling)
        self.loretta_adp_placement[adapter_name] = placement
        self.loretta_adp_width[adapter_name] = width
        self.loretta_adp_act[adapter_name] = ACT2FN[config.non_linearity]
        self.loretta_adp_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.loretta_adp_contraction[adapter_name] = config.contraction
        self.loretta_adp_normalize_input[adapter_name] = config.normalize_input
        self.factor_cache.entries.pop(adapter_name, None)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def factor_ref(self, adapter_name: str) -> TTFactorsRef:
        """down (``h x m``) and up (``m x h'``) built from their trains, in the base layer's dtype."""
        down_cores = core_list(self.loretta_adp_down[adapter_name])
        out_dtype = factor_dtype(self, down_cores)
        return TTFactorsRef(self.factor_cache, adapter_name, down_cores, core_list(self.loretta_adp_up[adapter_name]),
                            self.loretta_adp_width[adapter_name], out_dtype)

    def factor_refs_to_prepare(self, adapter_names: Optional[list[str]] = None) -> list[TTFactorsRef]:
        """Refs of the active adapters, or of ``adapter_names`` (those of a mixed-adapter batch)."""
        if self.disable_adapters:
            return []
        return [self.factor_ref(name) for name in (self.active_adapters if adapter_names is None else adapter_names)
                if name in self.loretta_adp_down and self.loretta_adp_contraction[name] != "sequential"]

    def adapter_output(self, adapter_name: str, h: torch.Tensor) -> torch.Tensor:
        """``s * up(act(down(dropout(h))))`` in ``h``'s dtype; ``h / rms(h)`` in place of ``h`` under
        ``normalize_input``; under ``weight_norm`` down and up rescaled (config) and up's bias added after its gain.

        down and up are thin (``h x m``, ``m x h``), so "split" and "reconstruct" both apply them as
        built; "sequential" pushes the activations through every core instead.
        """
        h = self.loretta_adp_dropout[adapter_name](h)
        if self.loretta_adp_normalize_input[adapter_name]:
            h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(h.dtype)
        down_cores, up_cores = core_list(self.loretta_adp_down[adapter_name]), core_list(self.loretta_adp_up[adapter_name])
        sequential = self.loretta_adp_contraction[adapter_name] == "sequential"
        if sequential:
            z = apply_train_sequential(h, down_cores, self.loretta_adp_width[adapter_name])
        else:
            down_factor, up_factor = self.factor_cache.factors(self.factor_ref(adapter_name))
            z = h @ down_factor.to(h.dtype)
        weight_norm = adapter_name in self.loretta_adp_gain
        if weight_norm:  # down at a dense init's norm, sqrt(m / 3): scaling z is scaling down
            z = z * (math.sqrt(z.shape[-1] / 3.0) / _norm(down_cores)).to(z.dtype)
        has_bias = adapter_name in self.loretta_adp_down_bias
        if has_bias:
            z = z + self.loretta_adp_down_bias[adapter_name].to(z.dtype)
        z = self.loretta_adp_act[adapter_name](z)
        if sequential:
            z = apply_train_sequential(z, up_cores, z.shape[-1])
        else:
            z = z @ up_factor.to(z.dtype)
        if weight_norm:
            z = z * (self.loretta_adp_gain[adapter_name] / _norm(up_cores)).to(z.dtype)
        if has_bias:
            z = z + self.loretta_adp_up_bias[adapter_name].to(z.dtype)
        if adapter_name in self.loretta_adp_scale:
            return z * self.loretta_adp_scale[adapter_name].to(z.dtype)
        return z * self.loretta_adp_fixed_scale[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise merge_error([adapter_name])


def _norm(cores: list[torch.Tensor]) -> torch.Tensor:
    """The train's Frobenius norm in float32 (bf16 Gram products lose the small ones)."""
    return frobenius_norm([core.float() for core in cores])


class LorettaAdpLinear(nn.Module, LorettaAdpLayer):
    """LoRETTA_adp around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LorettaAdpConfig, module_name: str = "",
                 placement: str = "output", **kwargs) -> None:
        super().__init__()
        LorettaAdpLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name, placement=placement)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise merge_error(adapter_names if adapter_names is not None else self.active_adapters)

    def unmerge(self) -> None:
        warnings.warn("Already unmerged. Nothing to do.")

    def _active(self, placement: str) -> list[str]:
        return [name for name in self.active_adapters
                if name in self.loretta_adp_down and self.loretta_adp_placement[name] == placement]

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        inputs = self._active("input")
        if inputs:
            x = x + sum(self.adapter_output(name, x) for name in inputs).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        beside = self._active("parallel")
        if beside:
            result = result + sum(self.adapter_output(name, x) for name in beside).to(result.dtype)
        outputs = self._active("output")
        if outputs:
            result = result + sum(self.adapter_output(name, result) for name in outputs).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """Row ``i`` through adapter ``adapter_names[i]``; ``"__base__"`` rows (and adapters this layer lacks)
        skip the residual bottleneck."""
        groups = [(name, rows) for name, rows in row_groups(adapter_names, x.device) if name in self.loretta_adp_down]
        inputs = [(name, rows) for name, rows in groups if self.loretta_adp_placement[name] == "input"]
        if inputs:
            x = x.clone()
            for name, rows in inputs:
                x[rows] = x[rows] + self.adapter_output(name, x[rows]).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        beside = [(name, rows) for name, rows in groups if self.loretta_adp_placement[name] == "parallel"]
        if beside:
            result = result.clone()
            for name, rows in beside:
                result[rows] = result[rows] + self.adapter_output(name, x[rows]).to(result.dtype)
        outputs = [(name, rows) for name, rows in groups if self.loretta_adp_placement[name] == "output"]
        if outputs:
            result = result.clone()
            for name, rows in outputs:
                result[rows] = result[rows] + self.adapter_output(name, result[rows]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "loretta_adp." + super().__repr__()


class LorettaAdpHead(TensorisedHead, LorettaAdpLayer):
    """The tensorised classifier head of a LoRETTA_adp adapter."""

    adapter_layer_names = ("loretta_adp_head", "loretta_adp_head_bias")
    other_param_names = ()
    head_attr = "loretta_adp_head"
    head_bias_attr = "loretta_adp_head_bias"

    def __repr__(self) -> str:
        return "loretta_adp_head." + super().__repr__()
