"""The LoRETTA_rep tuner: injects LorettaRepLinear layers into a model (peft's BaseTuner)."""

from __future__ import annotations

from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..factored_linear import check_merge_not_quantised
from ..grouped_factors import GroupedFactorsMixin
from ..mixed_batch import MixedBatchMixin
from ...budget import config_for_layer, plan_adapter
from ..loretta_common import prepare_trainable_extras
from ..state_dict_checks import ShapeCheckedLoadMixin
from .config import LorettaRepConfig
from .layer import LorettaRepHead, LorettaRepLayer, LorettaRepLinear


class LorettaRepModel(ShapeCheckedLoadMixin, MixedBatchMixin, GroupedFactorsMixin, BaseTuner):
    """Adds LoRETTA_rep adapters to the target linear layers of a model (default: LoRA's, query/value).

    With ``train_layernorms`` the layer norms, and with ``tensorised_head`` the classifier head's final
    projection, are trained and saved through peft's ``modules_to_save``; the head's dense layer becomes
    a :class:`LorettaRepHead`.
    """

    prefix: str = "loretta_rep_"
    tuner_layer_cls = LorettaRepLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    _head_key: Optional[str] = None

    def _prepare_model(self, peft_config: LorettaRepConfig, model: nn.Module) -> None:
        self._head_key = prepare_trainable_extras(peft_config, model, "LoRETTA_rep")
        plan_adapter(self, peft_config, model, "loretta_rep", skip=[self._head_key] if self._head_key else [])

    def _check_target_module_exists(self, peft_config, key):
        if self._head_key is not None and key == self._head_key:
            return True
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, config: LorettaRepConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        if current_key != self._head_key:
            config = config_for_layer(config, current_key)
        if isinstance(target, LorettaRepLayer):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if current_key == self._head_key:
            new_module = LorettaRepHead(target, adapter_name, config, module_name=current_key)
        elif isinstance(base_layer, (nn.Linear, Conv1D)):
            new_module = LorettaRepLinear(target, adapter_name, config, module_name=current_key)
        else:
            raise ValueError(
                f"LoRETTA_rep cannot adapt {current_key!r}: it is a {type(base_layer).__name__}; valid targets are "
                "nn.Linear and transformers' Conv1D layers"
            )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        check_merge_not_quantised(self.model)
