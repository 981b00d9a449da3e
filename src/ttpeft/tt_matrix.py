"""A matrix in tensor-train format, applied through thin factors (split at the middle bond).

``M (in x out)`` is the reshape of a TT over ``(p_1 .. p_a, q_1 .. q_b)`` with ``in = prod p``,
``out = prod q``. Contracting cores ``1..a`` gives ``A (in x r_a)`` and cores ``a+1..d`` give
``B (r_a x out)``, so ``x @ M = (x @ A) @ B``: two thin GEMMs, LoRA's cost, with no dense ``in x out``
buffer. Building A and B costs ``O(sum n_k r^2 ...)``, independent of the number of tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .tensor_train import contract_cores


def thin_factors(cores: Sequence[torch.Tensor], num_row_cores: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``A = cores[:a]`` as ``(prod p, r_a)`` and ``B = cores[a:]`` as ``(r_a, prod q)``."""
    row_factor = contract_cores(cores[:num_row_cores])
    bond = row_factor.shape[-1]
    col_factor = contract_cores(cores[num_row_cores:]).reshape(bond, -1)
    return row_factor, col_factor


def tt_matrix_dense(cores: Sequence[torch.Tensor], num_row_cores: int) -> torch.Tensor:
    """The dense ``(prod p) x (prod q)`` matrix (for merging and tests, not for the forward pass)."""
    row_factor, col_factor = thin_factors(cores, num_row_cores)
    return row_factor @ col_factor


def init_tt_matrix_cores(shape: Sequence[int], ranks: Sequence[int], num_row_cores: int, zero_last: bool,
                         generator: torch.Generator | None = None, balanced: bool = False) -> list[torch.Tensor]:
    """Random cores scaled so that ``A`` has LoRA-A-like entries (variance ``1 / (3 in)``, as
    kaiming-uniform with ``a = sqrt(5)``) and the prefix of ``B`` has unit-variance entries.

    With ``zero_last`` the last core is zero, so the matrix is exactly zero. As with LoRA's ``B = 0``,
    only that core gets a gradient at the first step; the others follow once it is non-zero.
    With ``balanced`` every random core is drawn at one entry scale, the geometric mean of those above: the
    same product in another gauge (Adam, whose steps ignore a core's size, then changes each core alike).
    """
    in_features = math.prod(shape[:num_row_cores])
    cores = []
    # Row side: the entries of A are sums over the interior bonds; split the target variance evenly.
    row_interior = math.prod(ranks[1:num_row_cores])
    row_var = (1.0 / (3.0 * in_features) / row_interior) ** (1.0 / num_row_cores)
    stds = [math.sqrt(row_var) if k < num_row_cores else 1.0 / math.sqrt(ranks[k]) for k in range(len(shape))]
    if balanced:
        random_cores = len(shape) - 1 if zero_last else len(shape)
        common = math.exp(sum(math.log(std) for std in stds[:random_cores]) / random_cores)
        stds = [common] * len(shape)
    for k, std in enumerate(stds):
        cores.append(torch.randn(ranks[k], shape[k], ranks[k + 1], generator=generator) * std)
    if zero_last:
        cores[-1].zero_()
    return cores
