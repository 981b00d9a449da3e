"""Pieces shared by the LoRETTA_rep and LoRETTA_adp tuners.

* tensorised weights: a ``rows x cols`` weight held as the cores of a tensor train whose row-major
  reshape is the matrix, applied as one or two thin matrices (never a dense ``ΔW``);
* trainable layer norms and the tensorised classifier head, both saved with the adapter: layer norms
  through peft's ``modules_to_save`` (a per-adapter trainable copy), the head as a tuner layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config_base import TensorTrainPeftConfig
from .mixed_batch import row_groups
from ..loretta_shapes import check_matrix_shape, check_tensor_cores, head_shape, row_split
from ..tensor_train import contract_cores, full_ranks
from ..tt_matrix import thin_factors

LORETTA_INITS = ("zero", "reference")


# ----------------------------------------------------------------------------- config checks


@dataclass
class LorettaConfigBase(TensorTrainPeftConfig):
    """Fields both LoRETTA methods have: their init, trained layer norms and the tensorised head."""

    init: Literal["zero", "reference"] = field(
        default="zero", metadata={"help": "'zero' (start at the base model) or 'reference' (published init)."}
    )
    train_layernorms: bool = field(default=True, metadata={"help": "Train and save every layer norm."})
    layernorm_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "With train_layernorms, only these layer norms: name suffixes or one regex "
                                        "matched against the full name (None: every one)."})
    tensorised_head: bool = field(default=False, metadata={"help": "Replace the head's dense layer by a TT layer."})
    head_tensor_shape: Optional[list[int]] = field(default=None, metadata={"help": "Train shape of the head layer."})
    tensor_cores: Optional[int] = field(
        default=None, metadata={"help": "Cores in each derived train of the two projections (None: published)."})

    def check_loretta_fields(self, cls_name: str, method: str) -> None:
        """The shared checks, then these fields'; each error names the field, its value and what is valid."""
        self.check_shared_fields(cls_name, method)
        if self.init not in LORETTA_INITS:
            raise ValueError(f"{cls_name}: init={self.init!r} is invalid; valid values: {LORETTA_INITS}")
        for flag in ("train_layernorms", "tensorised_head"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{cls_name}: {flag}={getattr(self, flag)!r} is invalid; valid: True or False")
        self.head_tensor_shape = normalise_shape(self.head_tensor_shape, cls_name, "head_tensor_shape")
        self.layernorm_modules = normalise_module_names(self.layernorm_modules, cls_name, "layernorm_modules")
        if self.layernorm_modules is not None and not self.train_layernorms:
            raise ValueError(f"{cls_name}: layernorm_modules={self.layernorm_modules!r} selects norms to train, but "
                             "train_layernorms=False; valid: train_layernorms=True, or layernorm_modules=None")
        check_tensor_cores(self.tensor_cores, cls_name)


def normalise_module_names(names, cls_name: str, option: str):
    """``None``, one regex string, or a non-empty list of module-name suffixes."""
    if names is None or (isinstance(names, str) and names):
        return names
    if isinstance(names, Sequence) and not isinstance(names, (str, bytes)) and names and all(
            isinstance(n, str) and n for n in names):
        return list(names)
    raise ValueError(f"{cls_name}: {option}={names!r} is invalid; valid: None, a regex string, or a list of module "
                     "name suffixes, e.g. ['output.LayerNorm']")


def normalise_shape(shape, cls_name: str, option: str) -> Optional[list[int]]:
    """``None`` or a list of positive ints (the products are checked per layer, where the sizes are known)."""
    if shape is None:
        return None
    if isinstance(shape, (str, bytes, int)) or not isinstance(shape, Sequence) or not shape or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in shape):
        raise ValueError(f"{cls_name}: {option}={shape!r} is invalid; valid: None or a list of positive ints, "
                         "e.g. [8, 8, 12, 8]")
    return [int(n) for n in shape]


# ----------------------------------------------------------------------------- tensorised weights


def tt_weight_factors(cores: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """The ``rows x cols`` weight of a train as matrices whose product is the weight.

    When leading cores multiply to ``rows``, two thin factors ``(rows x r)`` and ``(r x cols)`` split at
    that bond; otherwise (some published shapes straddle the row/column boundary) the weight itself,
    which for LoRETTA's factors is thin anyway (``rows * bottleneck`` entries).
    """
    cores = list(cores)
    split = row_split([core.shape[1] for core in cores], rows)
    if split is not None:
        return list(thin_factors(cores, split))
    return [contract_cores(cores).reshape(rows, -1)]


def tt_weight(cores: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
    """The dense ``rows x cols`` weight (for merging and tests)."""
    factors = tt_weight_factors(cores, rows)
    return factors[0] if len(factors) == 1 else factors[0] @ factors[1]


def apply_factors(x: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x @ F_1 @ F_2`` in the activations' dtype (the factors are thin, so casting them is cheap)."""
    for factor in factors:
        x = x @ factor.to(x.dtype)
    return x


def cores_with_entry_std(shape: Sequence[int], ranks: Sequence[int], entry_std: float,
                         generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """Gaussian cores whose reconstructed entries have standard deviation ``entry_std``.

    An entry is a sum of ``prod(interior ranks)`` products of one entry per core, so its variance is
    ``prod(interior ranks) * core_std^(2d)``; solve that for ``core_std``.
    """
    order = len(shape)
    interior = math.prod(ranks[1:-1])
    core_std = (entry_std ** 2 / interior) ** (1.0 / (2 * order))
    return [torch.randn(ranks[k], n, ranks[k + 1], generator=generator) * core_std for k, n in enumerate(shape)]


def cores_zero_last(shape: Sequence[int], ranks: Sequence[int],
                    generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """Cores whose product is exactly zero (last core zero) while every other core is random with a
    unit-variance contraction, so the last core gets a gradient at the first step (as LoRA's ``B = 0``)."""
    cores = [torch.randn(ranks[k], n, ranks[k + 1], generator=generator) / math.sqrt(ranks[k])
             for k, n in enumerate(shape)]
    cores[-1].zero_()
    return cores


def cores_reference(shape: Sequence[int], ranks: Sequence[int], rows: int, cols: int,
                    generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
    """The published code's initialisation: ``randn / sqrt(r_right) * (1 / (rows + cols)) ** (1 / (2d))``."""
    scale = (1.0 / (rows + cols)) ** (1.0 / (2 * len(shape)))
    return [torch.randn(ranks[k], n, ranks[k + 1], generator=generator) / math.sqrt(ranks[k + 1]) * scale
            for k, n in enumerate(shape)]


def tt_params(cores: Sequence[torch.Tensor]) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(core) for core in cores])


def resolve_weight_shape(explicit: Optional[Sequence[int]], default: tuple[int, ...], rows: int, cols: int,
                         where: str, option: str) -> tuple[int, ...]:
    """The explicit shape when given (validated), else the default."""
    if explicit is None:
        return default
    return check_matrix_shape(explicit, rows, cols, where, option)


def uniform_ranks(shape: Sequence[int], tensor_rank: int) -> tuple[int, ...]:
    """The same rank on every bond, as the published code (a bond may hold more than it can use: the
    extra entries are redundant, and parameter counts match the papers)."""
    return full_ranks(int(tensor_rank), len(shape))


# ----------------------------------------------------------------------------- layer norms


def is_norm_module(module: nn.Module) -> bool:
    """A normalisation layer with its own parameters (LayerNorm, RMSNorm, ... of any architecture)."""
    name = type(module).__name__
    return ("Norm" in name or "norm" in name) and any(True for _ in module.parameters(recurse=False))


def layer_norm_save_names(model: nn.Module, only=None, method: str = "") -> list[str]:
    """``modules_to_save`` entries that select exactly the model's layer norms (``only``: those whose name
    matches it, as ``layernorm_modules``).

    peft matches these entries as name suffixes, so the short names (``LayerNorm``, ``input_layernorm``,
    ...) are used when they select nothing but norms; otherwise the full module paths.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    keys = []
    for key, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            keys.append(key)  # already wrapped by an earlier adapter
        elif is_norm_module(module) and ".original_module" not in key and ".modules_to_save." not in key:
            keys.append(key)
    norm_keys = {k for k in keys if _is_norm_key(model, k)}
    if only is not None and norm_keys:
        chosen = {k for k in norm_keys if module_name_matches(k, only)}
        if not chosen:
            raise ValueError(f"{method}: layernorm_modules={only!r} matches none of the model's layer norms "
                             f"(e.g. {', '.join(sorted(norm_keys)[:3])}); valid: suffixes or a regex of these names")
        return sorted(chosen)
    if not norm_keys:
        return []
    leaf_names = sorted({key.rsplit(".", 1)[-1] for key in norm_keys})
    all_keys = [key for key, _ in model.named_modules()]
    selected = {key for key in all_keys if any(key.endswith(leaf) for leaf in leaf_names)}
    if selected == norm_keys:
        return leaf_names
    return sorted(norm_keys)


def module_name_matches(key: str, names) -> bool:
    """peft's rule for ``target_modules``: a string is a regex matched in full, a list holds name suffixes
    (None matches nothing)."""
    import re

    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == name or key.endswith("." + name) for name in names or ())


def _is_norm_key(model: nn.Module, key: str) -> bool:
    from peft.utils.other import AuxiliaryTrainingWrapper

    module = model.get_submodule(key)
    if isinstance(module, AuxiliaryTrainingWrapper):
        return is_norm_module(module.original_module)
    return is_norm_module(module)


# ----------------------------------------------------------------------------- classifier head


def find_classifier_head(model: nn.Module) -> Optional[tuple[str, Optional[str]]]:
    """``(hidden dense layer, final projection)`` of a sequence-classification head, or None.

    RoBERTa-style heads keep both in ``classifier`` (``classifier.dense`` / ``classifier.out_proj``);
    BERT/DeBERTa-style models have ``pooler.dense`` with the projection in ``classifier`` or ``score``.
    """
    keys = {key for key, _ in model.named_modules()}
    for key in sorted(keys):
        if key.endswith("classifier.dense") and isinstance(model.get_submodule(key), (nn.Linear, BaseTunerLayer)):
            container = key.rsplit(".", 1)[0]
            projection = container + ".out_proj"
            return key, projection if projection in keys else None
    for key in sorted(keys):
        if key.endswith("pooler.dense") and isinstance(model.get_submodule(key), (nn.Linear, BaseTunerLayer)):
            projection = next((name for name in ("classifier", "score") if name in keys), None)
            return key, projection
    return None


def prepare_trainable_extras(config, model: nn.Module, method: str) -> Optional[str]:
    """Put the layer norms and the head's final projection into ``config.modules_to_save`` (peft then
    trains and saves a per-adapter copy) and return the head's dense layer to tensorise, if any.

    A ``modules_to_save`` entry that would copy the whole head (peft adds ``classifier`` for sequence
    classification) is replaced by the final projection alone, so the dense layer is not copied and
    trained in full next to its tensorised replacement.
    """
    import re

    modules_to_save = list(config.modules_to_save or [])
    extra: list[str] = []
    head_dense = None
    if config.tensorised_head:
        head = find_classifier_head(model)
        if head is None:
            raise ValueError(
                f"{method}: tensorised_head=True, but the model has no classification-head dense layer (looked for "
                "'*classifier.dense' as in RoBERTa and '*pooler.dense' as in BERT/DeBERTa); valid: a sequence "
                "classifier of those families, or tensorised_head=False"
            )
        head_dense, projection = head
        modules_to_save = [m for m in modules_to_save if not re.match(rf"(^|.*\.){m}($|\..*)", head_dense)]
        if projection is not None:
            extra.append(projection)
    if config.train_layernorms:
        extra.extend(layer_norm_save_names(model, config.layernorm_modules, method))
    for name in extra:
        if name not in modules_to_save:
            modules_to_save.append(name)
    config.modules_to_save = modules_to_save or None
    return head_dense


class TensorisedHead(nn.Module):
    """A classifier head's hidden dense layer replaced (not adapted) by a trainable tensor-train layer,
    one per adapter; with adapters disabled, or for an adapter without a head, the original layer runs.

    Subclasses set ``head_attr`` (the ``ModuleDict`` of cores, named with the method's prefix) and
    ``head_bias_attr``, and mix in the method's tuner layer class.
    """

    head_attr: str
    head_bias_attr: str

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_name: str = "", **kwargs) -> None:
        nn.Module.__init__(self)
        self.init_head(base_layer)
        self.kwargs = kwargs
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def init_head(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        setattr(self, self.head_attr, nn.ModuleDict({}))
        setattr(self, self.head_bias_attr, nn.ParameterDict({}))
        self._disable_adapters = False
        self.merged_adapters = []
        self._original_weights: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"the classifier head's dense layer must be nn.Linear, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config, module_name: str = "") -> None:
        where = f"tensorised head {module_name!r}"
        shape = resolve_weight_shape(config.head_tensor_shape, head_shape(self.in_features, self.out_features),
                                     self.in_features, self.out_features, where, "head_tensor_shape")
        ranks = uniform_ranks(shape, config.tensor_rank)
        cores = cores_reference(shape, ranks, self.in_features, self.out_features)
        bound = 1.0 / math.sqrt(self.out_features)
        getattr(self, self.head_attr)[adapter_name] = tt_params(cores)
        getattr(self, self.head_bias_attr)[adapter_name] = nn.Parameter(
            torch.empty(self.out_features).uniform_(-bound, bound))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def factor_refs_to_prepare(self, adapter_names: Optional[list[str]] = None) -> list:
        return []  # one layer per model: it builds its weight in its own forward

    def _head_adapter(self) -> Optional[str]:
        return next((name for name in self.active_adapters if name in getattr(self, self.head_attr)), None)

    def head_weight(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W (out x in), b)`` of an adapter's head, for merging."""
        weight = tt_weight(list(getattr(self, self.head_attr)[adapter_name]), self.in_features)
        return weight.T, getattr(self, self.head_bias_attr)[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.head_weight(adapter_name)[0] - self.get_base_layer().weight

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names)
                         if name in getattr(self, self.head_attr)]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged_adapters:
            raise ValueError(f"cannot merge the tensorised heads of adapters {adapter_names + self.merged_adapters}: "
                             "a head replaces the dense layer, so only one adapter's head can be merged at a time")
        base = self.get_base_layer()
        weight, bias = self.head_weight(adapter_names[0])
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged head of adapter {adapter_names[0]!r}")
        self._original_weights = (base.weight.data.clone(), None if base.bias is None else base.bias.data.clone())
        base.weight.data = weight.detach().to(base.weight.dtype)
        if base.bias is not None:
            base.bias.data = bias.detach().to(base.bias.dtype)
        self.merged_adapters.append(adapter_names[0])

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        weight, bias = self._original_weights
        base.weight.data = weight
        if bias is not None:
            base.bias.data = bias
        self._original_weights = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, adapter_names: Optional[list[str]] = None,
                **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        adapter_name = self._head_adapter()
        if self.merged or adapter_name is None:
            return self.base_layer(x, *args, **kwargs)
        return self._head_forward(adapter_name, x)

    def _head_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        cores = list(getattr(self, self.head_attr)[adapter_name])
        out = apply_factors(x, tt_weight_factors(cores, self.in_features))
        return out + getattr(self, self.head_bias_attr)[adapter_name].to(out.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> torch.Tensor:
        """Row ``i`` through adapter ``adapter_names[i]``'s head; the original layer for ``"__base__"`` and for
        adapters without a head."""
        result = None
        for adapter_name, rows in row_groups(adapter_names, x.device):
            if adapter_name in getattr(self, self.head_attr):
                out = self._head_forward(adapter_name, x[rows])
            else:
                out = self.base_layer(x[rows], *args, **kwargs)
            if result is None:
                result = out.new_empty((len(x),) + tuple(out.shape[1:]))
            result[rows] = out
        return result

