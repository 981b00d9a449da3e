"""Configuration of LoRETTA_rep (Yang et al., NAACL 2024): LoRA whose A and B are tensor trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


from ...registration import ensure_peft_type
from ..loretta_common import LorettaConfigBase, normalise_shape


@dataclass
class LorettaRepConfig(LorettaConfigBase):
    """LoRETTA_rep: ``y = W0 x + (lora_alpha / r) * B A x`` with A (``r x in``) and B (``out x r``) each a
    tensor train over a factorisation of ``in * r`` (resp. ``r * out``).

    Args:
        r: LoRA bottleneck (the rank of ``B A``).
        lora_alpha: scale numerator (``lora_alpha / r``).
        tensor_rank: TT rank of every bond of A and B (the paper uses 5).
        a_tensor_shape / b_tensor_shape: explicit train shapes for A (multiplying to ``in * r``) and B
            (``r * out``); ``None`` uses the published shape for the widths the reference supports and a
            factorisation of the layer's width otherwise.
        tensor_cores: derive every train of the two projections with this many balanced cores instead of
            the published/automatic shape (explicit shapes still win); ``None`` (default) keeps those.
        target_modules: module names, a regex, or ``"all-linear"``; ``None``: LoRA's defaults (q, v).
        dropout: dropout on the adapter's input.
        contraction: how the trains are applied to activations (see ``ttpeft.contraction``):
            ``"split"`` (thin factors, default), ``"reconstruct"``, ``"sequential"`` or ``"auto"``.
        init: ``"zero"`` (A random, B's last core zero: the model starts at the base model; default) or
            ``"reference"`` (every core random as in the published code, so it does not).
        train_layernorms: train (and save) every layer norm, as in the paper (default True).
        layernorm_modules: with ``train_layernorms``, only the layer norms these select (name suffixes, or
            one regex matched against the full name, as ``target_modules``); ``None``: every one.
        tensorised_head: replace the classification head's hidden dense layer (BERT/DeBERTa pooler, RoBERTa
            classifier dense) by a trainable TT layer; the final projection is trained too.
        head_tensor_shape: train shape of that layer (published ``(8, 8, 12, 12, 8, 8)`` for 768).
        modules_to_save: extra modules to train and save (peft semantics).
        param_budget: total parameters of all LoRETTA_rep layers (A and B cores); shapes and one tensor
            rank per layer are planned to fit (``tensor_rank`` is then ignored; see :mod:`ttpeft.budget`).
        layer_plan: module name -> ``{"tensor_rank", "a_tensor_shape", "b_tensor_shape"}``; filled by
            ``param_budget`` and saved, so a reload rebuilds the same shapes.
    """

    r: int = field(default=8, metadata={"help": "LoRA bottleneck r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scale numerator: the update is scaled by lora_alpha / r."})
    tensor_rank: int = field(default=5, metadata={"help": "TT rank of the A and B trains."})
    a_tensor_shape: Optional[list[int]] = field(default=None, metadata={"help": "Train shape of A (in * r)."})
    b_tensor_shape: Optional[list[int]] = field(default=None, metadata={"help": "Train shape of B (r * out)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("loretta_rep")
        self.check_loretta_fields("LorettaRepConfig", "loretta_rep")
        for name in ("r", "tensor_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LorettaRepConfig: {name}={value!r} is invalid; valid: an int >= 1")
        self.a_tensor_shape = normalise_shape(self.a_tensor_shape, "LorettaRepConfig", "a_tensor_shape")
        self.b_tensor_shape = normalise_shape(self.b_tensor_shape, "LorettaRepConfig", "b_tensor_shape")
