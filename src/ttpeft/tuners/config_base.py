"""Config fields and checks shared by every ttpeft method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..budget import check_budget_fields
from ..contraction import check_strategy


@dataclass
class TensorTrainPeftConfig(PeftConfig):
    """peft's targeting options, dropout, the contraction strategy and budget planning.

    Subclasses set ``peft_type`` and call :meth:`check_shared_fields` from their ``__post_init__``.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to adapt, or 'all-linear'."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to leave out."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    contraction: Literal["split", "reconstruct", "sequential", "auto"] = field(
        default="split", metadata={"help": "How the trains are applied: split, reconstruct, sequential or auto."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save (e.g. a classifier head)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, when layers_to_transform is set."}
    )
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Unsupported; must be None."})
    param_budget: Optional[int] = field(
        default=None, metadata={"help": "Total adapter parameters: plan shapes and per-layer ranks to fit it."}
    )
    layer_plan: Optional[dict[str, dict]] = field(
        default=None, metadata={"help": "Per-layer shapes and ranks (module name -> fields); set by param_budget."}
    )

    def check_shared_fields(self, cls_name: str, method: str) -> None:
        """Each error names the field, its value and what is valid."""
        check_budget_fields(self, cls_name, method)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(f"{cls_name}: `layers_to_transform` cannot be used when `target_modules` is a regex str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{cls_name}: `layers_pattern` needs `layers_to_transform`.")
        if self.target_parameters:
            raise ValueError(f"{cls_name}: target_parameters={self.target_parameters!r} is not supported; "
                             "use target_modules")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{cls_name}: dropout={self.dropout!r} is invalid; valid: a float in [0, 1)")
        check_strategy(self.contraction, cls_name)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
