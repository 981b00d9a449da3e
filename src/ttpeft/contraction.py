"""Applying a TT matrix ``M (in x out)`` to activations: ``x @ M``.

Strategies (same outputs and gradients, different cost):
- ``split``: thin factors ``A (in x r)``, ``B (r x out)`` from the cores (cost independent of the
  number of tokens, shared by all layers of a shape, cached in eval), then two thin GEMMs: LoRA's cost.
- ``reconstruct``: the published algorithm: dense ``M = A @ B`` every call, then a full GEMM.
- ``sequential``: the published algorithm: push the activations through each core in turn.
- ``auto``: the cheapest of the three under :func:`strategy_costs`'s model of the layer and token count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .loretta_shapes import row_split
from .tensor_train import contract_cores

STRATEGIES = ("split", "reconstruct", "sequential")
STRATEGY_CHOICES = STRATEGIES + ("auto",)


def check_strategy(strategy: str, where: str) -> str:
    if strategy not in STRATEGY_CHOICES:
        raise ValueError(f"{where}: contraction={strategy!r} is invalid; valid values: {STRATEGY_CHOICES}")
    return strategy


def add_split(result: torch.Tensor, x: torch.Tensor, row_factor: torch.Tensor, col_factor: torch.Tensor) -> torch.Tensor:
    """``result + (x @ A) @ B``; the second GEMM and the addition are one ``addmm`` kernel."""
    out_features = col_factor.shape[-1]
    hidden = x.reshape(-1, x.shape[-1]) @ row_factor
    return torch.addmm(result.reshape(-1, out_features), hidden, col_factor).view(result.shape)


def add_reconstruct(result: torch.Tensor, x: torch.Tensor, row_factor: torch.Tensor,
                    col_factor: torch.Tensor) -> torch.Tensor:
    """``result + x @ (A @ B)`` with the dense ``in x out`` matrix built on every call."""
    dense = row_factor @ col_factor
    out_features = dense.shape[-1]
    return torch.addmm(result.reshape(-1, out_features), x.reshape(-1, x.shape[-1]), dense).view(result.shape)


def add_factored_update(result: torch.Tensor, h: torch.Tensor, strategy: str, factors,
                        sequential_update) -> torch.Tensor:
    """``result + h @ L @ R`` by ``strategy``: ``factors()`` gives ``(L, R)`` (scaled), ``sequential_update(h)``
    the same product computed core by core."""
    if strategy == "sequential":
        return result + sequential_update(h).to(result.dtype)
    row_factor, col_factor = factors()
    add_update = add_split if strategy == "split" else add_reconstruct
    return add_update(result, h, row_factor.to(h.dtype), col_factor.to(h.dtype))


def apply_sequential(x: torch.Tensor, cores: Sequence[torch.Tensor], num_row_cores: int) -> torch.Tensor:
    """``x @ M`` by contracting the activations with one core at a time (no factor is built)."""
    lead_shape = x.shape[:-1]
    tokens = math.prod(lead_shape)
    dtype = x.dtype
    # Row side: state (tokens, remaining input dims, bond); each step contracts one input factor.
    state = x.reshape(tokens, -1, 1)  # (T, prod p, r_0 = 1)
    for core in cores[:num_row_cores]:
        r_left, p, r_right = core.shape
        rest = state.shape[1] // p
        state = state.reshape(tokens, p, rest, r_left).permute(0, 2, 3, 1).reshape(tokens * rest, r_left * p)
        state = (state @ core.to(dtype).reshape(r_left * p, r_right)).reshape(tokens, rest, r_right)
    state = state.reshape(tokens, -1)  # (T, r_a)
    # Column side: each step appends one output factor.
    produced = 1
    for core in cores[num_row_cores:]:
        r_left, q, r_right = core.shape
        state = (state.reshape(-1, r_left) @ core.to(dtype).reshape(r_left, q * r_right))
        produced *= q
        state = state.reshape(tokens, produced * r_right)
    return state.reshape(*lead_shape, produced)


def apply_train_sequential(x: torch.Tensor, cores: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
    """``x @ W`` for a train holding a ``rows x cols`` weight, core by core when its cores split at
    ``rows``; a shape that straddles that boundary is contracted to its (thin) weight instead."""
    split = row_split([core.shape[1] for core in cores], rows)
    if split is None:
        return x @ contract_cores(list(cores)).reshape(rows, -1).to(x.dtype)
    return apply_sequential(x, cores, split)


# Cost model -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceCost:
    """A roofline-style model: time = flops / flops_per_s + bytes / bytes_per_s + kernels * launch_s."""

    flops_per_s: float
    bytes_per_s: float
    launch_s: float


DEVICE_COSTS = {
    "cpu": DeviceCost(flops_per_s=1e11, bytes_per_s=1e10, launch_s=4e-6),
    "cuda": DeviceCost(flops_per_s=4e14, bytes_per_s=2.5e12, launch_s=6e-6),
}


def _chain_cost(cores_shapes: Sequence[tuple[int, int, int]]) -> tuple[float, float, int]:
    """(flops, elements moved, kernels) of contracting consecutive cores left to right."""
    flops = moved = 0.0
    rows = cores_shapes[0][0] * cores_shapes[0][1]
    for r_left, n, r_right in cores_shapes[1:]:
        flops += 2.0 * rows * r_left * n * r_right
        moved += rows * r_left + r_left * n * r_right + rows * n * r_right
        rows *= n
    return flops, moved, max(len(cores_shapes) - 1, 0)


def strategy_costs(core_shapes: Sequence[tuple[int, int, int]], num_row_cores: int, num_tokens: int,
                   device_type: str = "cuda", element_bytes: int = 2, factors_cached: bool = False) -> dict[str, float]:
    """Modelled seconds of one forward of ``x @ M`` for each strategy."""
    cost = DEVICE_COSTS.get(device_type, DEVICE_COSTS["cuda"])
    rows, cols = core_shapes[:num_row_cores], core_shapes[num_row_cores:]
    in_features = math.prod(s[1] for s in rows)
    out_features = math.prod(s[1] for s in cols)
    bond = rows[-1][2]
    t = float(num_tokens)
    build = [0.0, 0.0, 0]
    if not factors_cached:
        for part in (rows, cols):
            f, m, k = _chain_cost(part)
            build = [build[0] + f, build[1] + m, build[2] + k]

    def seconds(flops, moved, kernels):
        return flops / cost.flops_per_s + moved * element_bytes / cost.bytes_per_s + kernels * cost.launch_s

    split = seconds(build[0] + 2 * t * bond * (in_features + out_features),
                    build[1] + t * (in_features + 2 * bond + out_features), build[2] + 2)
    reconstruct = seconds(build[0] + 2 * in_features * bond * out_features + 2 * t * in_features * out_features,
                          build[1] + 2 * in_features * out_features + t * (in_features + out_features),
                          build[2] + 2)
    seq_flops = seq_moved = 0.0
    remaining = in_features
    for r_left, p, r_right in rows:
        seq_flops += 2 * t * remaining * r_left * r_right
        seq_moved += 2 * t * remaining * r_left + t * remaining / p * r_right  # permute copy + output
        remaining //= p
    produced = 1
    for r_left, q, r_right in cols:
        seq_flops += 2 * t * produced * r_left * q * r_right
        produced *= q
        seq_moved += t * produced * r_right
    sequential = seconds(seq_flops, seq_moved, 2 * len(core_shapes))
    return {"split": split, "reconstruct": reconstruct, "sequential": sequential}


def choose_strategy(core_shapes: Sequence[tuple[int, int, int]], num_row_cores: int, num_tokens: int,
                    device_type: str = "cuda", element_bytes: int = 2, factors_cached: bool = False) -> str:
    costs = strategy_costs(core_shapes, num_row_cores, num_tokens, device_type, element_bytes, factors_cached)
    return min(costs, key=costs.get)
