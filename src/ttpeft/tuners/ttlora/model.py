"""The TT-LoRA tuner: injects TTLoraLinear layers into a model (peft's BaseTuner)."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...budget import config_for_layer, plan_adapter
from ..factored_linear import check_merge_not_quantised
from ..grouped_factors import GroupedFactorsMixin
from ..mixed_batch import MixedBatchMixin
from ..state_dict_checks import ShapeCheckedLoadMixin
from .config import TTLoraConfig
from .layer import TTLoraLayer, TTLoraLinear


class TTLoraModel(ShapeCheckedLoadMixin, MixedBatchMixin, GroupedFactorsMixin, BaseTuner):
    """Adds TT-LoRA adapters to the target linear layers of a model.

    Default targets are LoRA's (query/value projections) for architectures peft knows. Before each
    forward, the thin factors of all adapted layers are built together (see ``GroupedFactorsMixin``).
    """

    prefix: str = "ttlora_"
    tuner_layer_cls = TTLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_model(self, peft_config: TTLoraConfig, model: nn.Module) -> None:
        plan_adapter(self, peft_config, model, "ttlora")

    def _create_and_replace(self, config: TTLoraConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        config = config_for_layer(config, current_key)
        if isinstance(target, TTLoraLayer):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base_layer, (nn.Linear, Conv1D)):
            raise ValueError(
                f"TT-LoRA cannot adapt {current_key!r}: it is a {type(base_layer).__name__}; valid targets are "
                "nn.Linear and transformers' Conv1D layers"
            )
        new_module = TTLoraLinear(target, adapter_name, config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set active
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        super()._check_merge_allowed()
        check_merge_not_quantised(self.model)
