"""Compress a peft LoRA adapter into a TT-LoRA adapter.

Each LoRA layer's update ``ΔW = s · B A`` (``B: out x k``, ``A: k x in``) becomes a TT-LoRA train
holding ``M = ΔW^T / alpha`` (``in x out``, TT-LoRA's layout) over the factors
``(p_1 .. p_a | q_1 .. q_b)``, by TT-SVD. ``M = L R`` with thin ``L = A^T`` and ``R = (s / alpha) B^T``,
so the TT-SVD never forms ``M``:

1. QR of ``R^T = Q T`` and ``L <- L T^T``: now ``M = L Q^T`` with ``Q`` orthonormal columns. Right-
   multiplying by ``Q^T`` changes neither singular values nor left singular vectors, so the first
   ``a`` steps of TT-SVD on ``M`` are the TT-SVD steps on ``L`` reshaped ``(p_1, .., p_a, k)``
   (``in x k`` entries).
2. After the input side the remainder is ``S V^T Q^T``: ``r_a x out`` entries; the output side is the
   usual sweep over it.

The largest dense array is ``max(in, out) x k``: the same cores as TT-SVD on the dense ``M`` (up to
signs), which the tests check. The relative error of each layer is computed from the thin factors too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .budget import TTLoraRule
from .tensor_train import TensorTrain, _truncation_rank, full_ranks, max_useful_ranks, tt_num_params
from .tt_matrix import thin_factors

REPORT_FILE = "compression_report.json"
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
SAVED_PREFIX = "base_model.model."
TT_KEY = "{module}.ttlora_cores.{index}"


# ----------------------------------------------------------------------------- TT-SVD of L @ R


def low_rank_tt_svd(left: torch.Tensor, right: torch.Tensor, row_factors: Sequence[int], col_factors: Sequence[int],
                    max_rank: Union[int, Sequence[int], None] = None,
                    rel_error: Optional[float] = None) -> TensorTrain:
    """TT-SVD of ``M = left @ right`` (``left: in x k``, ``right: k x out``) as a TT over
    ``(*row_factors, *col_factors)``, without forming ``M``.

    Same contract as :func:`ttpeft.tensor_train.tt_svd`: with ``rel_error`` = eps each of the ``d - 1``
    truncations discards at most ``eps / sqrt(d - 1) * ||M||_F``; ``max_rank`` caps the ranks further
    (an int or one cap per interior bond); with neither the train is exact. Computed in float64.
    """
    row_factors, col_factors = tuple(int(n) for n in row_factors), tuple(int(n) for n in col_factors)
    shape = row_factors + col_factors
    rows, cols = math.prod(row_factors), math.prod(col_factors)
    if left.shape[0] != rows or right.shape[1] != cols or left.shape[1] != right.shape[0]:
        raise ValueError(f"factors {tuple(left.shape)} @ {tuple(right.shape)} do not match the TT shape "
                         f"{list(row_factors)} | {list(col_factors)} ({rows} x {cols})")
    if rel_error is not None and rel_error < 0:
        raise ValueError(f"rel_error must be >= 0, got {rel_error}")
    order = len(shape)
    caps = max_useful_ranks(shape) if max_rank is None else full_ranks(max_rank, order)
    orthonormal, triangular = torch.linalg.qr(right.detach().double().T)  # right = T^T Q^T
    left = left.detach().double() @ triangular.T
    per_step = (rel_error or 0.0) * float(torch.linalg.norm(left)) / math.sqrt(max(order - 1, 1))

    cores: list[torch.Tensor] = []
    num_rows = len(row_factors)
    remainder = left.reshape(row_factors[0], -1)  # rows (p_1), columns (p_2 .. p_a, k)
    rank_left = 1
    for k in range(order - 1):
        if k == num_rows:  # entering the output side: columns back from (k) to (q_1 .. q_b)
            remainder = (remainder @ orthonormal.T).reshape(rank_left * shape[k], -1)
        u, s, vh = torch.linalg.svd(remainder, full_matrices=False)
        rank = _truncation_rank(s, per_step, min(caps[k + 1], s.numel()))
        cores.append(u[:, :rank].reshape(rank_left, shape[k], rank))
        remainder = s[:rank, None] * vh[:rank]
        rank_left = rank
        if k + 1 != num_rows:
            remainder = remainder.reshape(rank * shape[k + 1], -1)
    if num_rows == order - 1:  # a single output core: the remainder is still in the (k) basis
        remainder = remainder @ orthonormal.T
    cores.append(remainder.reshape(rank_left, shape[-1], 1))
    return TensorTrain(cores)


def low_rank_error(left: torch.Tensor, right: torch.Tensor, other_left: torch.Tensor,
                   other_right: torch.Tensor) -> tuple[float, float]:
    """``(||L R - L' R'||_F, ||L R||_F)`` from the thin factors: ``L R - L' R' = [L, -L'] [R; R']``,
    whose norm is that of the product of the two small triangular QR factors (no cancellation)."""
    left, right = left.double(), right.double()
    stacked_left = torch.cat([left, -other_left.double()], dim=1)
    stacked_right = torch.cat([right, other_right.double()], dim=0)
    difference = torch.linalg.qr(stacked_left)[1] @ torch.linalg.qr(stacked_right.T)[1].T
    norm = torch.linalg.qr(left)[1] @ torch.linalg.qr(right.T)[1].T
    return float(torch.linalg.norm(difference)), float(torch.linalg.norm(norm))


def balance_cores(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale the cores to equal Frobenius norms, keeping their product.

    TT-SVD leaves every core orthonormal but the last, which carries the whole norm; equal norms give
    every core a similar relative step under Adam when the compressed adapter is trained further.
    """
    norms = [float(torch.linalg.norm(core)) for core in cores]
    if min(norms) == 0.0:
        return list(cores)
    target = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [core * (target / n) for core, n in zip(cores, norms)]


# ----------------------------------------------------------------------------- reading LoRA


@dataclass
class LoraLayer:
    module: str  # key in the base model, e.g. "bert.encoder.layer.0.attention.self.query"
    lora_a: torch.Tensor  # k x in
    lora_b: torch.Tensor  # out x k
    scaling: float

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def read_lora(adapter, adapter_name: str = "default"):
    """``(LoraConfig, layers, other saved tensors)`` from a peft LoRA adapter folder or a PeftModel."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(adapter, PeftModel):
        if adapter_name not in adapter.peft_config:
            raise ValueError(f"the model has no adapter {adapter_name!r}; it has {sorted(adapter.peft_config)}")
        config = adapter.peft_config[adapter_name]
        state = get_peft_model_state_dict(adapter, adapter_name=adapter_name)
    else:
        config, state = _read_adapter_folder(Path(adapter))
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"compress_lora takes a LoRA adapter; this one is {config.peft_type}")
    if getattr(config, "use_dora", False):
        raise ValueError("compress_lora cannot compress a DoRA adapter (its magnitude vector is not a weight update)")
    if getattr(config, "bias", "none") != "none":
        raise ValueError(f"compress_lora cannot compress a LoRA adapter with bias={config.bias!r}; valid: 'none'")
    modules = sorted(k[:-len(LORA_A)] for k in state if k.endswith(LORA_A))
    if not modules:
        unsupported = sorted(k for k in state if "lora_embedding" in k or "lora_" in k)[:3]
        raise ValueError("the adapter has no LoRA linear layers to compress"
                         + (f" (found {unsupported}: embedding and convolution LoRA are not supported)"
                            if unsupported else ""))
    layers, used = [], set()
    for key in modules:
        lora_a, lora_b = state[key + LORA_A], state[key + LORA_B]
        if lora_a.dim() != 2:
            raise ValueError(f"{key}: only linear LoRA layers can be compressed, lora_A has shape {tuple(lora_a.shape)}")
        module = key.removeprefix(SAVED_PREFIX)
        layers.append(LoraLayer(module, lora_a, lora_b, _scaling(config, module, lora_a.shape[0])))
        used.update((key + LORA_A, key + LORA_B))
    leftover = {k: v for k, v in state.items() if k not in used}
    lora_leftover = sorted(k for k in leftover if ".lora_" in k)
    if lora_leftover:
        raise ValueError(f"compress_lora cannot convert {lora_leftover[:3]} (only linear LoRA layers are supported)")
    return config, layers, leftover


def _read_adapter_folder(folder: Path):
    from peft import PeftConfig
    from safetensors.torch import load_file

    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    config = PeftConfig.from_pretrained(str(folder))
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        return config, load_file(str(weights))
    legacy = folder / "adapter_model.bin"
    if legacy.is_file():
        return config, torch.load(str(legacy), map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no adapter_model.safetensors")


def _scaling(config, module: str, rank: int) -> float:
    """LoRA's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), honouring per-module patterns."""
    alpha = config.lora_alpha
    for pattern, value in (getattr(config, "alpha_pattern", None) or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = value
    return alpha / math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha / rank


# ----------------------------------------------------------------------------- compressing


@dataclass
class CompressedAdapter:
    """A TT-LoRA adapter made from a LoRA one: config, saved-format state dict and a report."""

    config: object  # TTLoraConfig
    state_dict: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)

    def save_pretrained(self, output_dir: Union[str, Path]) -> Path:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and the compression report."""
        from safetensors.torch import save_file

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(output_dir))
        save_file({k: v.contiguous() for k, v in self.state_dict.items()}, str(output_dir / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        report = dict(self.report, adapter_file_bytes=(output_dir / "adapter_model.safetensors").stat().st_size)
        (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return output_dir

    def to_peft_model(self, base_model, adapter_name: str = "default", is_trainable: bool = False):
        """The base model with this adapter, as ``PeftModel.from_pretrained`` would give it."""
        import copy

        from peft import get_peft_model, set_peft_model_state_dict

        config = copy.deepcopy(self.config)
        config.inference_mode = not is_trainable
        model = get_peft_model(base_model, config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, self.state_dict, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if "ttlora_" in k]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"the compressed adapter does not fit the model: missing {missing[:3]}, "
                               f"unexpected {list(result.unexpected_keys)[:3]}")
        return model

    def summary(self) -> str:
        return format_report(self.report)


def compress_lora(adapter, output_dir: Union[str, Path, None] = None, *, tt_rank=None,
                  rel_error: Optional[float] = None, param_budget: Optional[int] = None,
                  tt_shape: Optional[Sequence[Sequence[int]]] = None, factors_per_side: Optional[int] = None,
                  alpha: float = 8.0, adapter_name: str = "default", balance: bool = True) -> CompressedAdapter:
    """Turn a peft LoRA adapter (a saved folder or a PeftModel) into a TT-LoRA adapter.

    Each layer's ``ΔW = s · B A`` is compressed by TT-SVD on LoRA's thin factors (see the module
    docstring), over balanced factors of its in/out features (or ``tt_shape`` for every layer), with:

    * ``tt_rank``: a rank cap, an int or one per bond;
    * ``rel_error``: each layer within this relative Frobenius error (combinable with ``tt_rank``);
    * ``param_budget``: at most this many TT parameters in total: the same relative error for every
      layer, the smallest that fits (found by bisection);
    * none of them: exact (the train then usually holds more numbers than the LoRA factors).

    ``factors_per_side`` (how many factors each of in/out features is split into): by default, with
    ``param_budget`` the count (1 to 4) whose trains have the lowest overall error, with ``rel_error``
    the one with the fewest parameters, otherwise 3 (TT-LoRA's default). A LoRA update is a rank-k
    matrix, and fewer factors keep more of that structure.

    Tensors that are not LoRA factors (``modules_to_save`` such as a classifier head) are copied as they
    are. The result reloads with ``PeftModel.from_pretrained`` after ``import ttpeft``; with ``output_dir``
    it is also saved there, with a ``compression_report.json``.
    """
    from .tuners.ttlora import TTLoraConfig

    if rel_error is not None and param_budget is not None:
        raise ValueError("give rel_error or param_budget, not both (a budget sets the error)")
    if rel_error is not None and not 0 <= rel_error:
        raise ValueError(f"rel_error={rel_error!r} is invalid; valid: a float >= 0")
    if factors_per_side is not None and factors_per_side < 1:
        raise ValueError(f"factors_per_side={factors_per_side!r} is invalid; valid: an int >= 1, or None (automatic)")
    lora_config, layers, extras = read_lora(adapter, adapter_name)
    factors = {layer.module: (layer.lora_a.double().T, (layer.scaling / alpha) * layer.lora_b.double().T)
               for layer in layers}

    def candidate(count):
        rule = TTLoraRule(tt_shape, count)
        shapes = {layer.module: _layer_shape(rule, layer, count) for layer in layers}

        def compress_all(error):
            return {layer.module: low_rank_tt_svd(*factors[layer.module], *shapes[layer.module], max_rank=tt_rank,
                                                  rel_error=error) for layer in layers}

        if param_budget is not None:
            trains, error = _fit_budget(compress_all, param_budget, layers, shapes)
        else:
            trains, error = compress_all(rel_error), rel_error
        return count, shapes, trains, error

    tried = {}
    if factors_per_side is not None or tt_shape is not None or (param_budget is None and rel_error is None):
        count, shapes, trains, rel_error = candidate(factors_per_side or 3)
    else:
        options = []
        for count in AUTO_FACTORS_PER_SIDE:
            try:
                options.append(candidate(count))
            except ValueError:  # a budget below this count's minimum
                continue
        if not options:
            options.append(candidate(max(AUTO_FACTORS_PER_SIDE)))  # raises the smallest minimum's error
        scores = {option[0]: _overall_error(option[2], factors, option[1]) if param_budget is not None
                  else sum(train.num_params() for train in option[2].values()) for option in options}
        tried = {f"{count}": score for count, score in scores.items()}
        count, shapes, trains, rel_error = min(options, key=lambda option: (scores[option[0]], -option[0]))
    factors_per_side = count

    dtype = next(iter(layers)).lora_a.dtype
    state, plan, rows = {}, {}, []
    for layer in layers:
        train, (in_factors, out_factors) = trains[layer.module], shapes[layer.module]
        cores = balance_cores(train.cores) if balance else train.cores
        for index, core in enumerate(cores):
            state[SAVED_PREFIX + TT_KEY.format(module=layer.module, index=index)] = core.to(dtype).contiguous()
        plan[layer.module] = {"tt_shape": [list(in_factors), list(out_factors)], "tt_rank": list(train.ranks[1:-1])}
        row_factor, col_factor = thin_factors(train.cores, len(in_factors))
        error, norm = low_rank_error(*factors[layer.module], row_factor, col_factor)
        rows.append(_layer_row(layer, train, in_factors, out_factors, error, norm, dtype, alpha))
    state.update(extras)

    config = TTLoraConfig(
        target_modules=[layer.module for layer in layers], layer_plan=plan, alpha=alpha, init="zero",
        factors_per_side=factors_per_side, modules_to_save=lora_config.modules_to_save,
        task_type=lora_config.task_type, base_model_name_or_path=lora_config.base_model_name_or_path,
        revision=lora_config.revision, inference_mode=True,
    )
    report = _report(rows, extras, dtype, tt_rank=tt_rank, rel_error=rel_error, param_budget=param_budget,
                     alpha=alpha, factors_per_side=factors_per_side, tt_shape=tt_shape,
                     factors_per_side_tried=tried or None,
                     source=str(adapter) if isinstance(adapter, (str, Path)) else type(adapter).__name__)
    result = CompressedAdapter(config, state, report)
    if output_dir is not None:
        result.save_pretrained(output_dir)
    return result


def _layer_shape(rule: TTLoraRule, layer: LoraLayer, factors_per_side: int):
    from .budget import LayerSpec

    return rule.shape(LayerSpec(layer.module, layer.in_features, layer.out_features))


AUTO_FACTORS_PER_SIDE = (1, 2, 3, 4)


def _overall_error(trains: dict, factors: dict, shapes: dict) -> float:
    """Relative Frobenius error of all layers' updates together."""
    squared_errors = squared_norms = 0.0
    for module, train in trains.items():
        row_factor, col_factor = thin_factors(train.cores, len(shapes[module][0]))
        error, norm = low_rank_error(*factors[module], row_factor, col_factor)
        squared_errors, squared_norms = squared_errors + error ** 2, squared_norms + norm ** 2
    return math.sqrt(squared_errors / squared_norms) if squared_norms else 0.0


def _fit_budget(compress_all, budget: int, layers, shapes):
    """The smallest common relative error whose trains fit ``budget``, by bisection (trains shrink as
    the error grows). At ``sqrt(d - 1)`` every truncation may discard the whole norm: rank 1 on every
    bond, the minimum, which is what a budget below every tried error gets."""
    def total(trains):
        return sum(train.num_params() for train in trains.values())

    minimum = sum(tt_num_params(in_f + out_f, 1) for in_f, out_f in shapes.values())
    if budget < minimum:
        raise ValueError(f"param_budget={budget:,} is too small to compress {len(layers)} LoRA layers: the minimum is "
                         f"{minimum:,} parameters (a rank-1 train on every layer); valid: param_budget >= {minimum}")
    exact = compress_all(None)
    if total(exact) <= budget:
        return exact, 0.0
    high = max(math.sqrt(len(in_f) + len(out_f) - 1) for in_f, out_f in shapes.values())
    low, best = 0.0, compress_all(high)
    for _ in range(40):
        mid = (low + high) / 2
        trains = compress_all(mid)
        if total(trains) <= budget:
            high, best = mid, trains
        else:
            low = mid
        if high - low < 1e-4:
            break
    return best, high


# ----------------------------------------------------------------------------- reporting


def _layer_row(layer: LoraLayer, train: TensorTrain, in_factors, out_factors, error, norm, dtype, alpha) -> dict:
    size = torch.tensor([], dtype=dtype).element_size()
    before = layer.rank * (layer.in_features + layer.out_features)
    after = train.num_params()
    return {"module": layer.module, "in_features": layer.in_features, "out_features": layer.out_features,
            "lora_rank": layer.rank, "tt_shape": [list(in_factors), list(out_factors)],
            "tt_rank": list(train.ranks[1:-1]), "params_before": before, "params_after": after,
            "bytes_before": before * size, "bytes_after": after * size,
            "rel_error": error / norm if norm > 0 else 0.0, "delta_norm": norm * alpha}


def _report(rows, extras, dtype, **settings) -> dict:
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    squared_norms = sum(r["delta_norm"] ** 2 for r in rows)
    squared_errors = sum((r["rel_error"] * r["delta_norm"]) ** 2 for r in rows)
    size = torch.tensor([], dtype=dtype).element_size()
    extra_params = sum(v.numel() for v in extras.values())
    return {
        "settings": settings, "dtype": str(dtype).removeprefix("torch."), "layers": rows,
        "total": {"layers": len(rows), "params_before": before, "params_after": after,
                  "bytes_before": before * size, "bytes_after": after * size,
                  "compression_ratio": before / after if after else float("inf"),
                  "rel_error": math.sqrt(squared_errors / squared_norms) if squared_norms else 0.0,
                  "max_layer_rel_error": max((r["rel_error"] for r in rows), default=0.0)},
        "copied_unchanged": {"tensors": sorted(extras), "params": extra_params},
    }


def format_report(report: dict) -> str:
    lines = [f"{'layer':<48} {'shape':<24} {'ranks':<16} {'before':>8} {'after':>8} {'rel. error':>10}"]
    for row in report["layers"]:
        name = row["module"] if len(row["module"]) <= 48 else "…" + row["module"][-47:]
        shape = " | ".join(",".join(map(str, side)) for side in row["tt_shape"])
        lines.append(f"{name:<48} {shape:<24} {','.join(map(str, row['tt_rank'])):<16} {row['params_before']:>8,} "
                     f"{row['params_after']:>8,} {row['rel_error']:>10.4f}")
    total = report["total"]
    lines.append(f"total: {total['layers']} layers, {total['params_before']:,} -> {total['params_after']:,} parameters "
                 f"({total['compression_ratio']:.1f}x fewer), {total['bytes_before']:,} -> {total['bytes_after']:,} "
                 f"bytes ({report['dtype']}), relative error {total['rel_error']:.4f} overall, "
                 f"{total['max_layer_rel_error']:.4f} at worst")
    copied = report["copied_unchanged"]
    if copied["tensors"]:
        lines.append(f"copied unchanged: {len(copied['tensors'])} tensors, {copied['params']:,} parameters "
                     "(modules_to_save, e.g. the classification head)")
    return "\n".join(lines)


__all__ = ["CompressedAdapter", "balance_cores", "compress_lora", "format_report", "low_rank_error",
           "low_rank_tt_svd", "read_lora"]
