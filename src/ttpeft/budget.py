"""Planning shapes and per-layer ranks so that an adapter fits a parameter budget.

The budget counts the parameters of the adapter layers themselves (tensor-train cores, and for
LoRETTA_adp the adapter biases). What a method trains besides (layer norms, a classification head,
``modules_to_save``) is the same at every budget and is reported separately.

The plan: every layer gets balanced factors (TT-LoRA: input side descending, output side ascending;
LoRETTA: the published shape where there is one). Then one rank level for all layers, the largest
that fits (bond ranks are capped by what a bond can hold), and what is left goes one rank step at a
time to the widest layers first. A plan is stored in the config as ``layer_plan`` (module name ->
the config fields of that layer), so a saved adapter reloads with the same shapes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from .loretta_shapes import factor_shape
from .shapes import balanced_factors
from .tensor_train import max_useful_ranks, tt_num_params

# Config fields a layer_plan entry may set, per method.
PLAN_FIELDS = {
    "ttlora": ("tt_shape", "tt_rank"),
    "loretta_rep": ("tensor_rank", "a_tensor_shape", "b_tensor_shape"),
    "loretta_adp": ("tensor_rank", "down_tensor_shape", "up_tensor_shape"),
}


@dataclass(frozen=True)
class LayerSpec:
    """A target layer as the planner sees it. ``width`` is what a LoRETTA_adp adapter's ``down`` reads and
    ``up_width`` what its ``up`` writes (the same but for a parallel adapter)."""

    name: str
    in_features: int
    out_features: int
    width: Optional[int] = None
    up_width: Optional[int] = None


@dataclass(frozen=True)
class LayerPlan:
    name: str
    in_features: int
    out_features: int
    fields: dict  # this layer's config fields (shape and ranks)
    params: int


@dataclass
class BudgetPlan:
    method: str
    budget: int
    minimum: int
    layers: list[LayerPlan] = field(default_factory=list)
    extra_params: int = 0  # trained besides the adapter layers (layer norms, head), outside the budget

    @property
    def total(self) -> int:
        return sum(layer.params for layer in self.layers)

    def layer_plan(self) -> dict[str, dict]:
        return {layer.name: copy.deepcopy(layer.fields) for layer in self.layers}

    def table(self) -> str:
        return format_plan_table(self.method, [(l.name, l.in_features, l.out_features, l.fields, l.params)
                                               for l in self.layers], self.budget, self.extra_params)


# ------------------------------------------------------------------------------------ method rules


class TTLoraRule:
    """TT-LoRA: balanced factors (or the config's tt_shape); rank level R gives every bond min(R, room)."""

    method = "ttlora"

    def __init__(self, tt_shape: Optional[Sequence[Sequence[int]]] = None, factors_per_side: int = 3):
        self.tt_shape = tt_shape
        self.factors_per_side = factors_per_side
        self._rooms: dict = {}

    def shape(self, layer: LayerSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self.tt_shape is not None:
            in_factors, out_factors = (tuple(int(n) for n in side) for side in self.tt_shape)
            if math.prod(in_factors) != layer.in_features or math.prod(out_factors) != layer.out_features:
                raise ValueError(
                    f"param_budget: tt_shape {list(in_factors)} | {list(out_factors)} does not fit {layer.name!r} "
                    f"({layer.in_features} -> {layer.out_features}); valid: tt_shape=None (a shape per layer) or "
                    "factors multiplying to every target layer's in and out features")
            return in_factors, out_factors
        return ttlora_balanced_shape(layer.in_features, layer.out_features, self.factors_per_side)

    def _shape_and_room(self, layer: LayerSpec):
        key = (layer.in_features, layer.out_features)
        if key not in self._rooms:
            in_factors, out_factors = self.shape(layer)
            self._rooms[key] = (in_factors + out_factors, max_useful_ranks(in_factors + out_factors)[1:-1])
        return self._rooms[key]

    def max_level(self, layer: LayerSpec) -> int:
        return max(self._shape_and_room(layer)[1])

    def ranks(self, layer: LayerSpec, level: int) -> list[int]:
        return [min(level, r) for r in self._shape_and_room(layer)[1]]

    def params(self, layer: LayerSpec, level: int) -> int:
        shape, room = self._shape_and_room(layer)
        ranks = (1, *(min(level, r) for r in room), 1)
        return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))

    def fields(self, layer: LayerSpec, level: int) -> dict:
        in_factors, out_factors = self.shape(layer)
        return {"tt_shape": [list(in_factors), list(out_factors)], "tt_rank": self.ranks(layer, level)}


class LorettaRule:
    """LoRETTA_rep (A: ``in x r``, B: ``r x out``) or LoRETTA_adp (down: ``h x m``, up: ``m x h'``, plus
    biases): one tensor rank per layer, as the layers take it."""

    def __init__(self, method: str, bottleneck: int, first_shape=None, second_shape=None, bias_params: int = 0,
                 cores=None, adapter_bias: bool = True):
        self.method = method
        self.bottleneck = bottleneck
        self.cores = cores
        self.first_shape, self.second_shape = first_shape, second_shape
        self.bias_params = bias_params  # per layer, on top of width-dependent biases (a learned scale)
        self.adapter_bias = adapter_bias  # LoRETTA_adp's projection biases: bottleneck + width
        self.names = PLAN_FIELDS[method][1:]

    def _widths(self, layer: LayerSpec) -> tuple[int, int]:
        if self.method == "loretta_rep":
            return layer.in_features, layer.out_features
        return layer.width, layer.up_width or layer.width

    def shapes(self, layer: LayerSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        first_width, second_width = self._widths(layer)
        first = tuple(self.first_shape or factor_shape(first_width, self.bottleneck, width_first=True,
                                                       cores=self.cores))
        second = tuple(self.second_shape or factor_shape(second_width, self.bottleneck, width_first=False,
                                                         cores=self.cores))
        return first, second

    def max_level(self, layer: LayerSpec) -> int:
        return max(max(max_useful_ranks(shape)) for shape in self.shapes(layer))

    def params(self, layer: LayerSpec, level: int) -> int:
        first, second = self.shapes(layer)
        biases = 0
        if self.method == "loretta_adp":
            biases = (self.bottleneck + self._widths(layer)[1] if self.adapter_bias else 0) + self.bias_params
        return tt_num_params(first, level) + tt_num_params(second, level) + biases

    def fields(self, layer: LayerSpec, level: int) -> dict:
        first, second = self.shapes(layer)
        return {"tensor_rank": level, self.names[0]: list(first), self.names[1]: list(second)}


def ttlora_balanced_shape(in_features: int, out_features: int, factors_per_side: int = 3):
    """Balanced TT-LoRA factors: the input side descending, the output side ascending (its mirror), so
    the largest cores sit at the two ends where they cost ``n * rank``."""
    return (balanced_factors(in_features, factors_per_side),
            tuple(sorted(balanced_factors(out_features, factors_per_side))))


def rule_for_config(config, method: str):
    if method == "ttlora":
        return TTLoraRule(config.tt_shape, config.factors_per_side)
    if method == "loretta_rep":
        return LorettaRule(method, config.r, config.a_tensor_shape, config.b_tensor_shape,
                           cores=config.tensor_cores)
    if method == "loretta_adp":
        return LorettaRule(method, config.bottleneck_size, config.down_tensor_shape, config.up_tensor_shape,
                           bias_params=int(config.scaling == "learned") + int(config.weight_norm),
                           cores=config.tensor_cores,
                           adapter_bias=config.adapter_bias)
    raise ValueError(f"no budget planner for method {method!r}; valid: {sorted(PLAN_FIELDS)}")


# ------------------------------------------------------------------------------------------ planner


def minimum_params(layers: Sequence[LayerSpec], rule) -> int:
    return sum(rule.params(layer, 1) for layer in layers)


def plan_budget(layers: Sequence[LayerSpec], budget: int, rule) -> BudgetPlan:
    """Shapes and ranks for ``layers`` whose parameters total at most ``budget``.

    Raises a ValueError naming the minimum (a rank-1 train on every layer) when the budget is below it.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"param_budget={budget!r} is invalid; valid: an int >= 1")
    if not layers:
        raise ValueError("param_budget: no target layers to plan for; check target_modules")
    cost = _cached_cost(rule)
    minimum = sum(cost(layer, 1) for layer in layers)
    if budget < minimum:
        raise ValueError(
            f"param_budget={budget:,} is too small for {rule.method} on {len(layers)} target layers: the minimum is "
            f"{minimum:,} parameters (a rank-1 train on every layer); valid: param_budget >= {minimum}, or fewer "
            "target_modules")
    caps = [rule.max_level(layer) for layer in layers]

    def total(level: int) -> int:
        return sum(cost(layer, min(level, cap)) for layer, cap in zip(layers, caps))

    low, high = 1, max(caps)  # total(low) fits
    while low < high:
        mid = (low + high + 1) // 2
        if total(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    levels = [min(low, cap) for cap in caps]
    spent = total(low)
    # The rest, one rank step per layer, widest layers first. One pass is enough: every layer one step
    # higher did not fit, and each step taken only shrinks what is left.
    order = sorted(range(len(layers)), key=lambda i: (-(layers[i].in_features + layers[i].out_features), i))
    for i in order:
        if levels[i] < caps[i]:
            step = cost(layers[i], levels[i] + 1) - cost(layers[i], levels[i])
            if spent + step <= budget:
                levels[i] += 1
                spent += step
    plans = [LayerPlan(layer.name, layer.in_features, layer.out_features, rule.fields(layer, level),
                       cost(layer, level)) for layer, level in zip(layers, levels)]
    return BudgetPlan(rule.method, budget, minimum, plans)


def _cached_cost(rule) -> Callable[[LayerSpec, int], int]:
    """``rule.params`` memoised on the layer's sizes (models repeat a few layer sizes many times)."""
    cache: dict = {}

    def cost(layer: LayerSpec, level: int) -> int:
        key = (layer.in_features, layer.out_features, layer.width, layer.up_width, level)
        if key not in cache:
            cache[key] = rule.params(layer, level)
        return cache[key]

    return cost


# ------------------------------------------------------------------------- config and tuner wiring


def check_budget_fields(config, cls_name: str, method: str) -> None:
    """Validate ``param_budget`` and ``layer_plan`` of a config (JSON turns tuples into lists: accept both)."""
    budget = config.param_budget
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"{cls_name}: param_budget={budget!r} is invalid; valid: None or an int >= 1")
    plan = config.layer_plan
    if plan is None:
        return
    allowed = PLAN_FIELDS[method]
    if not isinstance(plan, dict) or any(not isinstance(k, str) or not isinstance(v, dict) for k, v in plan.items()):
        raise ValueError(f"{cls_name}: layer_plan must map module names to dicts of {allowed}, got {type(plan).__name__}")
    for name, entry in plan.items():
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise ValueError(f"{cls_name}: layer_plan[{name!r}] sets {unknown}; valid fields: {allowed}")


def config_for_layer(config, key: str):
    """The config a layer is built from: the config itself, or a copy with the layer's planned fields."""
    plan = getattr(config, "layer_plan", None)
    if not plan:
        return config
    if key not in plan:
        raise ValueError(
            f"layer_plan has no entry for target {key!r} (it plans {len(plan)} layers, e.g. {next(iter(plan))!r}); "
            "valid: target_modules that select exactly the planned layers, or layer_plan=None with param_budget "
            "set to plan again")
    layer_config = copy.copy(config)
    for name, value in plan[key].items():
        setattr(layer_config, name, copy.deepcopy(value))
    layer_config.layer_plan = None
    return layer_config


def target_layers(tuner, config, model, method: str, skip: Sequence[str] = ()) -> list[LayerSpec]:
    """The layers the tuner will adapt, found with peft's own matching (before injection)."""
    from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers

    from .tuners.loretta_adp.config import adapter_widths
    from .tuners.ttlora.layer import base_layer_features

    _maybe_include_all_linear_layers(config, model)
    named = list(model.named_modules())
    adapter_internals = [key + "." for key, module in named if isinstance(module, BaseTunerLayer)]
    layers = []
    for key, module in named:
        if not key or key in skip or any(key.startswith(prefix) for prefix in adapter_internals):
            continue
        if not tuner._check_target_module_exists(config, key):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        try:
            in_features, out_features = base_layer_features(base)
        except TypeError:
            continue  # the tuner itself reports a target it cannot adapt
        width = up_width = None
        if method == "loretta_adp":
            width, up_width = adapter_widths(config.placement_of(key), int(in_features), int(out_features))
        layers.append(LayerSpec(key, int(in_features), int(out_features), width, up_width))
    return layers


def plan_adapter(tuner, config, model, method: str, skip: Sequence[str] = ()) -> Optional[BudgetPlan]:
    """Called by a tuner before injection: fill ``config.layer_plan`` from ``config.param_budget``.

    A config that already has a plan (a reloaded adapter, a compressed one) keeps it.
    """
    if config.param_budget is None or config.layer_plan is not None:
        return None
    layers = target_layers(tuner, config, model, method, skip)
    plan = plan_budget(layers, config.param_budget, rule_for_config(config, method))
    config.layer_plan = plan.layer_plan()
    return plan


CONFIG_CLASSES = {"ttlora": "TTLoraConfig", "loretta_rep": "LorettaRepConfig", "loretta_adp": "LorettaAdpConfig"}


def plan_model(model, method: str, param_budget: int, adapter_name: str = "default", **config_fields) -> BudgetPlan:
    """The plan ``method`` with ``param_budget`` makes for ``model``, by injecting the adapter as training
    would (so targets and defaults are the method's own). Build the model on the meta device to plan
    without weights; the model is adapted in place. ``plan.extra_params``: what else the method trains."""
    import torch
    from peft import get_peft_model

    import ttpeft
    from peft.tuners.tuners_utils import BaseTunerLayer

    if method not in CONFIG_CLASSES:
        raise ValueError(f"no budget planner for method {method!r}; valid: {sorted(CONFIG_CLASSES)}")
    config = getattr(ttpeft, CONFIG_CLASSES[method])(param_budget=param_budget, **config_fields)
    device = next(model.parameters()).device
    with torch.device(device):  # new cores where the weights are: nothing is allocated on meta
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    tuner, config = peft_model.base_model, peft_model.peft_config[adapter_name]
    head = getattr(tuner, "_head_key", None)
    layers = target_layers(tuner, config, tuner.model, method, skip=[head] if head else [])
    plan = plan_budget(layers, param_budget, rule_for_config(config, method))
    if plan.layer_plan() != config.layer_plan:
        raise RuntimeError("the stored layer plan differs from a fresh plan of the same model")
    in_layers = set()
    for layer in plan.layers:
        module = tuner.model.get_submodule(layer.name)
        if isinstance(module, BaseTunerLayer):
            in_layers.update(id(p) for n, p in module.named_parameters() if adapter_name in n.split("."))
    plan.extra_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad and id(p) not in in_layers)
    return plan


# ------------------------------------------------------------------------------------------ reports


def format_plan_table(method: str, rows, budget: Optional[int], extra_params: int = 0) -> str:
    """``rows``: (name, in, out, fields, params). One line per layer, then the totals."""
    lines = [f"{'layer':<48} {'in -> out':>13}  {'shape':<34} {'ranks':<18} {'params':>10}"]
    total = 0
    for name, in_features, out_features, fields, params in rows:
        shape, ranks = _shape_and_ranks(fields)
        lines.append(f"{_short(name, 48):<48} {f'{in_features} -> {out_features}':>13}  {shape:<34} {ranks:<18} "
                     f"{params:>10,}")
        total += params
    summary = f"{method}: {len(rows)} layers, {total:,} adapter parameters"
    if budget is not None:
        summary += f" (budget {budget:,}, {100.0 * total / budget:.1f}% used)"
    lines.append(summary)
    if extra_params:
        lines.append(f"also trained, outside the budget (layer norms, head, modules_to_save): {extra_params:,}")
    return "\n".join(lines)


def _shape_and_ranks(fields: dict) -> tuple[str, str]:
    if "tt_shape" in fields:
        in_factors, out_factors = fields["tt_shape"]
        shape = f"{','.join(map(str, in_factors))} | {','.join(map(str, out_factors))}"
        rank = fields["tt_rank"]
        return shape, ",".join(map(str, rank)) if isinstance(rank, (list, tuple)) else str(rank)
    shapes = [v for k, v in fields.items() if k.endswith("_tensor_shape") and v is not None]
    return " ; ".join(",".join(map(str, s)) for s in shapes), str(fields.get("tensor_rank"))


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


__all__ = [
    "BudgetPlan",
    "LayerPlan",
    "LayerSpec",
    "LorettaRule",
    "TTLoraRule",
    "config_for_layer",
    "format_plan_table",
    "minimum_params",
    "plan_adapter",
    "plan_budget",
    "plan_model",
    "rule_for_config",
    "ttlora_balanced_shape",
]
