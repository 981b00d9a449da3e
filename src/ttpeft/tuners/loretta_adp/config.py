"""Configuration of LoRETTA_adp (Yang et al., NAACL 2024): bottleneck adapters whose projections are
tensor trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from transformers.activations import ACT2FN

from ...registration import ensure_peft_type
from ..loretta_common import LorettaConfigBase, module_name_matches, normalise_shape

# Encoder blocks: an output adapter after each attention-output and FFN-output dense layer.
_ENCODER_TARGETS = r".*\.output\.dense"
# LLaMA-family blocks: input adapters before gate_proj/up_proj, an output adapter after down_proj.
_LLAMA_TARGETS = ["gate_proj", "up_proj", "down_proj"]
_LLAMA_INPUT_ADAPTERS = ["gate_proj", "up_proj"]

LORETTA_ADP_TARGET_MODULES: dict[str, Union[str, list[str]]] = {
    "bert": _ENCODER_TARGETS, "roberta": _ENCODER_TARGETS, "xlm-roberta": _ENCODER_TARGETS,
    "deberta": _ENCODER_TARGETS, "deberta-v2": _ENCODER_TARGETS, "electra": _ENCODER_TARGETS,
    "llama": _LLAMA_TARGETS, "mistral": _LLAMA_TARGETS, "qwen2": _LLAMA_TARGETS, "qwen3": _LLAMA_TARGETS,
    "gemma": _LLAMA_TARGETS, "gemma2": _LLAMA_TARGETS,
}
LORETTA_ADP_INPUT_ADAPTER_MODULES: dict[str, list[str]] = {
    model_type: _LLAMA_INPUT_ADAPTERS for model_type, targets in LORETTA_ADP_TARGET_MODULES.items()
    if targets is _LLAMA_TARGETS
}


def adapter_widths(placement: str, in_features: int, out_features: int) -> tuple[int, int]:
    """(what ``down`` reads, what ``up`` writes) for an adapter at ``placement`` on an ``in -> out`` layer."""
    return (out_features if placement == "output" else in_features,
            in_features if placement == "input" else out_features)


@dataclass
class LorettaAdpConfig(LorettaConfigBase):
    """LoRETTA_adp: a bottleneck adapter ``h <- h + s * up(act(down(h)))`` whose ``down`` (``h -> m``) and
    ``up`` (``m -> h``) are tensor trains (with biases, as published).

    An output adapter acts on a target layer's output; an input adapter on its input, before the layer.

    Args:
        bottleneck_size: ``m`` (the paper uses 64).
        tensor_rank: TT rank of every bond of ``down`` and ``up`` (the paper uses 5).
        non_linearity: a transformers activation name (``ACT2FN``), e.g. ``"relu"`` (the paper's choice).
        scaling: a float, or ``"learned"`` for a trainable scalar per adapter layer (starting at 1).
        adapter_bias: a trained bias on ``down`` and on ``up`` (default True, as published). ``False`` drops
            both (``m + h`` parameters an adapter), leaving a small budget to the trains or to layer norms.
        normalize_input: divide the adapter's input by its root mean square over the features (per token, no
            parameters), so every ``down`` sees inputs of one scale. Off by default, as published. An
            encoder's sublayer outputs differ widely in size (MiniLM at [CLS]: 194 after layer 0's FFN, 4.9
            after its attention, 0.7 after layer 2's); on MiniLM at a 7,000-parameter budget it kept the
            learning-rate search off a rate at which the published adapter never starts learning.
        weight_norm: weight-normalised projections (Salimans & Kingma, 2016): ``up`` is a trained gain per adapter,
            starting at 0, times its train scaled to unit Frobenius norm, and ``down`` is its train rescaled to the
            norm of a dense init (``sqrt(m / 3)``). Off by default (not in the paper). Under Adam a product of
            cores can grow many-fold in a few steps; with this the adapter's output grows at most linearly in the
            gain. On MiniLM at a 7,000-parameter budget (with ``normalize_input``) all eight STS-B seeds at 1e-2
            reached a Pearson of 0.70 or more, where one of the plain adapter's eight stalled at 0.39; the rate
            at which the held-out run collapses moved from 2e-2 to 4e-2, not away. ``up``'s cores all start
            random (the zero gain keeps the base model).
        dropout: dropout on the adapter's input.
        target_modules: module names or a regex; ``None``: after every ``*.output.dense`` of BERT/RoBERTa/
            DeBERTa blocks, and around ``gate_proj``/``up_proj``/``down_proj`` of LLaMA-family models.
        input_adapter_modules: which targets get their adapter on the input instead of the output (name
            suffixes); ``None``: ``gate_proj``/``up_proj`` for LLaMA-family models, none otherwise.
        parallel_adapter_modules: which targets get their adapter beside the layer instead (name suffixes):
            ``y = layer(x) + s * up(act(down(x)))`` with ``down`` ``in -> m`` and ``up`` ``m -> out``, the
            parallel adapter of He et al. (2022). Off by default (the paper's adapters are sequential).
        down_tensor_shape / up_tensor_shape: explicit train shapes (multiplying to ``h * m``); ``None``
            uses the published shape where the reference has one and a factorisation otherwise.
        tensor_cores: derive every train of the two projections with this many balanced cores instead of
            the published/automatic shape (explicit shapes still win); ``None`` (default) keeps those.
        contraction: how the trains are applied to activations (see ``ttpeft.contraction``):
            ``"split"`` (thin factors, default), ``"reconstruct"``, ``"sequential"`` or ``"auto"``.
        init: ``"zero"`` (up's last core and any biases zero: the model starts at the base model; default) or
            ``"reference"`` (every core random as published, so it does not).
        train_layernorms: train (and save) every layer norm, as in the paper (default True).
        layernorm_modules: with ``train_layernorms``, only the layer norms these select (name suffixes, or
            one regex matched against the full name, as ``target_modules``); ``None``: every one.
        tensorised_head / head_tensor_shape: as for LoRETTA_rep.
        modules_to_save: extra modules to train and save (peft semantics).
        param_budget: total parameters of all adapter layers (cores and any biases); shapes and one tensor
            rank per layer are planned to fit (``tensor_rank`` is then ignored; see :mod:`ttpeft.budget`).
        layer_plan: module name -> ``{"tensor_rank", "down_tensor_shape", "up_tensor_shape"}``; filled
            by ``param_budget`` and saved, so a reload rebuilds the same shapes.
    """

    bottleneck_size: int = field(default=64, metadata={"help": "Adapter bottleneck m."})
    tensor_rank: int = field(default=5, metadata={"help": "TT rank of the down and up trains."})
    non_linearity: str = field(default="relu", metadata={"help": "Activation name (transformers ACT2FN)."})
    scaling: Union[float, str] = field(default=1.0, metadata={"help": "Adapter output scale, or 'learned'."})
    adapter_bias: bool = field(default=True, metadata={"help": "Train a bias on down and on up (as published)."})
    normalize_input: bool = field(default=False, metadata={"help": "RMS-normalise the adapter's input."})
    weight_norm: bool = field(default=False, metadata={"help": "Weight-normalised projections, up with a gain from 0."})
    input_adapter_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Targets whose adapter acts on their input (name suffixes)."}
    )
    parallel_adapter_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Targets whose adapter runs beside them, from their input (name suffixes)."}
    )
    down_tensor_shape: Optional[list[int]] = field(default=None, metadata={"help": "Train shape of down (h * m)."})
    up_tensor_shape: Optional[list[int]] = field(default=None, metadata={"help": "Train shape of up (m * h)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type("loretta_adp")
        self.check_loretta_fields("LorettaAdpConfig", "loretta_adp")
        for name in ("bottleneck_size", "tensor_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LorettaAdpConfig: {name}={value!r} is invalid; valid: an int >= 1")
        if self.non_linearity not in ACT2FN:
            raise ValueError(f"LorettaAdpConfig: non_linearity={self.non_linearity!r} is invalid; valid: "
                             f"{sorted(ACT2FN)}")
        if self.scaling != "learned" and (isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float))):
            raise ValueError(f"LorettaAdpConfig: scaling={self.scaling!r} is invalid; valid: a float or 'learned'")
        for name in ("adapter_bias", "normalize_input", "weight_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LorettaAdpConfig: {name}={getattr(self, name)!r} is invalid; valid: True or False")
        if self.weight_norm and self.init == "reference":
            raise ValueError("LorettaAdpConfig: weight_norm=True with init='reference' is invalid: a weight-normalised "
                             "adapter starts from a zero gain, not from the published random start; valid: "
                             "init='zero' with weight_norm=True, or weight_norm=False")
        if isinstance(self.scaling, int):
            self.scaling = float(self.scaling)
        for name in ("input_adapter_modules", "parallel_adapter_modules"):
            names = getattr(self, name)
            if names is None:
                continue
            if isinstance(names, str) or any(not isinstance(m, str) for m in names):
                raise ValueError(f"LorettaAdpConfig: {name}={names!r} is invalid; valid: None or a list of module "
                                 "names, e.g. ['gate_proj', 'up_proj']")
            setattr(self, name, list(names))
        self.down_tensor_shape = normalise_shape(self.down_tensor_shape, "LorettaAdpConfig", "down_tensor_shape")
        self.up_tensor_shape = normalise_shape(self.up_tensor_shape, "LorettaAdpConfig", "up_tensor_shape")

    def placement_of(self, key: str) -> str:
        """Where the adapter of target ``key`` acts: ``"input"``, ``"parallel"`` or ``"output"``."""
        is_input = module_name_matches(key, self.input_adapter_modules)
        is_parallel = module_name_matches(key, self.parallel_adapter_modules)
        if is_input and is_parallel:
            raise ValueError(f"LoRETTA_adp on {key!r}: it matches both input_adapter_modules="
                             f"{self.input_adapter_modules!r} and parallel_adapter_modules="
                             f"{self.parallel_adapter_modules!r}; valid: at most one of them")
        return "input" if is_input else "parallel" if is_parallel else "output"
