"""The LoRETTA_adp tuner: injects LorettaAdpLinear layers into a model (peft's BaseTuner)."""

from __future__ import annotations

from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..grouped_factors import GroupedFactorsMixin
from ..mixed_batch import MixedBatchMixin
from ...budget import config_for_layer, plan_adapter
from ..loretta_common import prepare_trainable_extras
from ..state_dict_checks import ShapeCheckedLoadMixin
from .config import LORETTA_ADP_INPUT_ADAPTER_MODULES, LORETTA_ADP_TARGET_MODULES, LorettaAdpConfig
from .layer import LorettaAdpHead, LorettaAdpLayer, LorettaAdpLinear, merge_error


class LorettaAdpModel(ShapeCheckedLoadMixin, MixedBatchMixin, GroupedFactorsMixin, BaseTuner):
    """Adds LoRETTA_adp adapters to a model: by default output adapters after every ``*.output.dense`` of
    BERT/RoBERTa/DeBERTa blocks and, for LLaMA-family models, input adapters before ``gate_proj`` and
    ``up_proj`` and an output adapter after ``down_proj``.

    Layer norms and the tensorised head are handled as in :class:`~ttpeft.LorettaRepModel`. Adapters
    with a non-linearity cannot be merged: ``merge_adapter``/``merge_and_unload`` raise a ValueError.
    """

    prefix: str = "loretta_adp_"
    tuner_layer_cls = LorettaAdpLayer
    target_module_mapping = LORETTA_ADP_TARGET_MODULES
    _head_key: Optional[str] = None

    def _prepare_adapter_config(self, peft_config: LorettaAdpConfig, model_config: dict) -> LorettaAdpConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            targets = LORETTA_ADP_TARGET_MODULES.get(model_type)
            if targets is None:
                raise ValueError(
                    f"LoRETTA_adp has no default placement for model_type={model_type!r}; pass target_modules "
                    f"(and input_adapter_modules for adapters on a layer's input). Known: "
                    f"{sorted(LORETTA_ADP_TARGET_MODULES)}"
                )
            peft_config.target_modules = targets if isinstance(targets, str) else set(targets)
        if peft_config.input_adapter_modules is None and model_type in LORETTA_ADP_INPUT_ADAPTER_MODULES:
            peft_config.input_adapter_modules = list(LORETTA_ADP_INPUT_ADAPTER_MODULES[model_type])
        return peft_config

    def _prepare_model(self, peft_config: LorettaAdpConfig, model: nn.Module) -> None:
        self._head_key = prepare_trainable_extras(peft_config, model, "LoRETTA_adp")
        plan_adapter(self, peft_config, model, "loretta_adp", skip=[self._head_key] if self._head_key else [])

    def _check_target_module_exists(self, peft_config, key):
        if self._head_key is not None and key == self._head_key:
            return True
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, config: LorettaAdpConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        if current_key != self._head_key:
            config = config_for_layer(config, current_key)
        placement = config.placement_of(current_key)
        if isinstance(target, LorettaAdpHead):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        if isinstance(target, LorettaAdpLayer):
            target.update_layer(adapter_name, config, module_name=current_key, placement=placement)
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if current_key == self._head_key:
            new_module = LorettaAdpHead(target, adapter_name, config, module_name=current_key)
        elif isinstance(base_layer, (nn.Linear, Conv1D)):
            new_module = LorettaAdpLinear(target, adapter_name, config, module_name=current_key, placement=placement)
        else:
            raise ValueError(
                f"LoRETTA_adp cannot adapt {current_key!r}: it is a {type(base_layer).__name__}; valid targets are "
                "nn.Linear and transformers' Conv1D layers"
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise merge_error(self.active_adapters)
