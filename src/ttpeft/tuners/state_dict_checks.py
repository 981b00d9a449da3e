"""Checks run when an adapter checkpoint is loaded onto a model."""

from __future__ import annotations

import torch


def check_adapter_state_dict_shapes(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Raise a ValueError naming the module when a saved adapter tensor does not fit the model.

    This happens when an adapter is loaded onto a base whose layer sizes differ from the one it was
    trained on (the adapter's shapes were derived from those sizes).
    """
    model_state = model.state_dict()
    for key, tensor in state_dict.items():
        if prefix not in key:
            continue
        expected = model_state.get(key)
        if expected is None:
            lookup = key.removeprefix("base_model.model.")
            expected = model_state.get(lookup)
        if expected is not None and tuple(expected.shape) != tuple(tensor.shape):
            module = key.split("." + prefix)[0].removeprefix("base_model.model.")
            raise ValueError(
                f"cannot load the adapter into {module!r}: saved tensor {key!r} has shape {tuple(tensor.shape)} but "
                f"this model needs {tuple(expected.shape)}; the adapter was trained on a base model whose layer "
                "sizes differ from this one (load it onto the base model it was trained with)"
            )


class ShapeCheckedLoadMixin:
    """For ``BaseTuner`` subclasses: loading a checkpoint checks its tensors' shapes against the model."""

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_state_dict_shapes(model, remapped, cls.prefix)
        return remapped
