"""Configuration of TT-LoRA (Anjum et al. 2024): ΔW of each target layer is one tensor train."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


from ...registration import ensure_peft_type
from ..config_base import TensorTrainPeftConfig

TTLORA_INITS = ("zero", "random", "balanced")


@dataclass
class TTLoraConfig(TensorTrainPeftConfig):
    """Configuration of a TT-LoRA adapter: ``y = W0 x + alpha * ΔW x`` with ΔW a tensor train.

    Args:
        target_modules: module names, a regex, or ``"all-linear"`` (peft semantics). ``None`` uses the
            architecture's default (query/value projections).
        tt_shape: ``(input factors, output factors)``: products must equal the layer's in and out
            features. ``None`` picks, per layer, the shape with the fewest parameters at ``tt_rank``.
        tt_rank: one rank for every bond, or a per-bond list (``len(tt_shape) - 1`` interior bonds).
        alpha: scale of the update (the published default is 8).
        dropout: dropout on the adapter's input.
        init: ``"zero"`` (the last core is zero so ΔW = 0 at the start; default), ``"random"`` (every
            core random, as in the reference code) or ``"balanced"`` (as ``"zero"``, each random core rescaled
            to one common entry scale: the same ΔW, but Adam moves every core at the same relative rate).
        factors_per_side: how many factors an automatic shape (or a ``param_budget`` plan) splits each of
            in/out features into. Fewer factors give fewer, larger cores at a lower rank for the same
            parameters; they train faster in short runs (benchmarks/quality: 2 beat 3 at a small budget).
        contraction: how ``ΔW x`` is computed: ``"split"`` (two thin GEMMs, default), ``"reconstruct"``
            or ``"sequential"`` (the published algorithms), or ``"auto"`` (cheapest by a cost model).
        param_budget: total parameters of all TT-LoRA layers; shapes and per-bond ranks are planned per
            layer to fit (``tt_rank`` is then ignored; see :mod:`ttpeft.budget`).
        layer_plan: module name -> ``{"tt_shape", "tt_rank"}`` for that layer; filled by ``param_budget``
            (or by :func:`ttpeft.compress_lora`) and saved, so a reload rebuilds the same shapes.
    """

    tt_shape: Optional[list[list[int]]] = field(
        default=None, metadata={"help": "[input factors, output factors]; derived per layer when None."}
    )
    tt_rank: Union[int, list[int]] = field(default=5, metadata={"help": "TT rank, or one rank per bond."})
    alpha: float = field(default=8.0, metadata={"help": "Scale of ΔW."})
    init: Literal["zero", "random", "balanced"] = field(
        default="zero",
        metadata={"help": "'zero' (ΔW=0 at start), 'random' or 'balanced' ('zero', cores at one scale)."},
    )
    factors_per_side: int = field(default=3, metadata={"help": "Factors per side for automatic shapes."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for layers storing (in, out) weights."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("ttlora")
        self.check_shared_fields("TTLoraConfig", "ttlora")
        if self.init not in TTLORA_INITS:
            raise ValueError(f"TTLoraConfig: init={self.init!r} is invalid; valid values: {TTLORA_INITS}")
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
