"""Configuration of TT-LoRA (Anjum et al. 2024): ΔW of each target layer is one tensor train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ...contraction import STRATEGY_CHOICES
from ...budget import check_budget_fields
from ...registration import ensure_peft_type

TTLORA_INITS = ("zero", "random")


@dataclass
class TTLoraConfig(PeftConfig):
    """Configuration of a TT-LoRA adapter: ``y = W0 x + alpha * ΔW x`` with ΔW a tensor train.

    Args:
        target_modules: module names, a regex, or ``"all-linear"`` (peft semantics). ``None`` uses the
            architecture's default (query/value projections).
        tt_shape: ``(input factors, output factors)``: products must equal the layer's in and out
            features. ``None`` picks, per layer, the shape with the fewest parameters at ``tt_rank``.
        tt_rank: one rank for every bond, or a per-bond list (``len(tt_shape) - 1`` interior bonds).
        alpha: scale of the update (the published default is 8).
        dropout: dropout on the adapter's input.
        init: ``"zero"`` (the last core is zero so ΔW = 0 at the start; default) or ``"random"``
            (every core random, as in the reference code).
        factors_per_side: how many factors an automatic shape splits each of in/out features into.
        contraction: how ``ΔW x`` is computed: ``"split"`` (two thin GEMMs, default), ``"reconstruct"``
            or ``"sequential"`` (the published algorithms), or ``"auto"`` (cheapest by a cost model).
        param_budget: total parameters of all TT-LoRA layers; shapes and per-bond ranks are planned per
            layer to fit (``tt_rank`` is then ignored; see :mod:`ttpeft.budget`).
        layer_plan: module name -> ``{"tt_shape", "tt_rank"}`` for that layer; filled by ``param_budget``
            (or by :func:`ttpeft.compress_lora`) and saved, so a reload rebuilds the same shapes.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to adapt, or 'all-linear'."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or regex to leave out."}
    )
    tt_shape: Optional[list[list[int]]] = field(
        default=None, metadata={"help": "[input factors, output factors]; derived per layer when None."}
    )
    tt_rank: Union[int, list[int]] = field(default=5, metadata={"help": "TT rank, or one rank per bond."})
    alpha: float = field(default=8.0, metadata={"help": "Scale of ΔW."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    init: Literal["zero", "random"] = field(default="zero", metadata={"help": "'zero' (ΔW=0 at start) or 'random'."})
    factors_per_side: int = field(default=3, metadata={"help": "Factors per side for automatic shapes."})
    contraction: Literal["split", "reconstruct", "sequential", "auto"] = field(
        default="split", metadata={"help": "How ΔW x is computed: split, reconstruct, sequential or auto."}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for layers storing (in, out) weights."})
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

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("ttlora")
        check_budget_fields(self, "TTLoraConfig", "ttlora")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("TTLoraConfig: `layers_to_transform` cannot be used when `target_modules` is a regex str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("TTLoraConfig: `layers_pattern` needs `layers_to_transform`.")
        if self.target_parameters:
            raise ValueError(f"TTLoraConfig: target_parameters={self.target_parameters!r} is not supported; "
                             "use target_modules")
        if self.init not in TTLORA_INITS:
            raise ValueError(f"TTLoraConfig: init={self.init!r} is invalid; valid values: {TTLORA_INITS}")
        if self.contraction not in STRATEGY_CHOICES:
            raise ValueError(f"TTLoraConfig: contraction={self.contraction!r} is invalid; valid values: "
                             f"{STRATEGY_CHOICES}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TTLoraConfig: dropout={self.dropout!r} must be in [0, 1)")
        if self.factors_per_side < 1:
            raise ValueError(f"TTLoraConfig: factors_per_side={self.factors_per_side!r} must be >= 1")
        ranks = list(self.tt_rank) if isinstance(self.tt_rank, (list, tuple)) else [self.tt_rank]
        if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
            raise ValueError(f"TTLoraConfig: tt_rank={self.tt_rank!r} must be an int >= 1 or a list of them")
        if self.tt_shape is not None:
            self.tt_shape = _normalise_tt_shape(self.tt_shape)


def _normalise_tt_shape(tt_shape) -> list[list[int]]:
    valid = "a pair [input factors, output factors] of positive ints, e.g. [[64, 4, 3], [3, 4, 64]]"
    if not isinstance(tt_shape, (list, tuple)) or len(tt_shape) != 2:
        raise ValueError(f"TTLoraConfig: tt_shape={tt_shape!r} is invalid; expected {valid}")
    sides = []
    for side in tt_shape:
        if isinstance(side, int) or not side or any(not isinstance(n, int) or n < 1 for n in side):
            raise ValueError(f"TTLoraConfig: tt_shape={tt_shape!r} is invalid; expected {valid}")
        sides.append([int(n) for n in side])
    return sides
