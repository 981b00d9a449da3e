"""Tensor trains: cores, ranks, dense reconstruction, parameter counts and TT-SVD.

A tensor train of shape ``(n_1, ..., n_d)`` with ranks ``(1, r_1, ..., r_{d-1}, 1)`` is a list of
cores ``G_k`` of shape ``(r_{k-1}, n_k, r_k)``. This module only depends on torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch



def full_ranks(rank: int | Sequence[int], order: int) -> tuple[int, ...]:
    """Expand an int or a per-bond list into the ``order + 1`` ranks ``(1, r_1, ..., r_{d-1}, 1)``.

    A per-bond list has ``order - 1`` entries (the interior bonds) or ``order + 1`` entries with
    1 at both ends.
    """
    if order < 1:
        raise ValueError(f"a tensor train needs at least one core, got order {order}")
    if isinstance(rank, int):
        bonds = [rank] * (order - 1)
    else:
        bonds = [int(r) for r in rank]
        if len(bonds) == order + 1:
            if bonds[0] != 1 or bonds[-1] != 1:
                raise ValueError(f"boundary ranks must be 1, got ranks {tuple(bonds)}")
            bonds = bonds[1:-1]
        elif len(bonds) != order - 1:
            raise ValueError(
                f"a train of {order} cores has {order - 1} interior bonds; got {len(bonds)} ranks {tuple(bonds)}"
            )
    if any(r < 1 for r in bonds):
        raise ValueError(f"TT ranks must be >= 1, got {tuple(bonds)}")
    return (1, *bonds, 1)


def max_useful_ranks(shape: Sequence[int]) -> tuple[int, ...]:
    """Largest rank each bond can usefully have: ``min(prod(left dims), prod(right dims))``."""
    shape = tuple(int(n) for n in shape)
    bounds = [1]
    for k in range(1, len(shape)):
        bounds.append(min(math.prod(shape[:k]), math.prod(shape[k:])))
    bounds.append(1)
    return tuple(bounds)


def tt_num_params(shape: Sequence[int], rank: int | Sequence[int]) -> int:
    """Number of entries in the cores of a TT: ``sum_k r_{k-1} * n_k * r_k``."""
    ranks = full_ranks(rank, len(shape))
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))


def contract_cores(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract consecutive cores left to right into a matrix ``(r_first * prod(n), r_last)``.

    The row index runs over ``(r_first, n_1, ..., n_k)`` in C order. Each step is one matmul.
    """
    result = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        r_left, n, r_right = core.shape
        result = (result @ core.reshape(r_left, n * r_right)).reshape(-1, r_right)
    return result


def frobenius_norm(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Frobenius norm of the train's dense tensor, from the cores alone (a product of ``r x r`` Gram matrices)."""
    gram = cores[0].new_ones(1, 1)
    for core in cores:
        gram = torch.einsum("ab,anc,bnd->cd", gram, core, core)
    return gram.trace().clamp_min(0).sqrt()


def to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor ``T[i_1..i_d] = G_1[:, i_1, :] @ ... @ G_d[:, i_d, :]``."""
    shape = tuple(core.shape[1] for core in cores)
    return contract_cores(cores).reshape(shape)


@dataclass
class TensorTrain:
    """A tensor train held as a list of cores of shape ``(r_{k-1}, n_k, r_k)``."""

    cores: list[torch.Tensor]

    def __post_init__(self):
        if not self.cores:
            raise ValueError("a tensor train needs at least one core")
        for k, core in enumerate(self.cores):
            if core.dim() != 3:
                raise ValueError(f"core {k} must be 3-D (r_left, n, r_right), got shape {tuple(core.shape)}")
        if self.cores[0].shape[0] != 1 or self.cores[-1].shape[-1] != 1:
            raise ValueError(
                f"boundary ranks must be 1, got {self.cores[0].shape[0]} and {self.cores[-1].shape[-1]}"
            )
        for k in range(len(self.cores) - 1):
            if self.cores[k].shape[-1] != self.cores[k + 1].shape[0]:
                raise ValueError(
                    f"cores {k} and {k + 1} disagree on their bond: {tuple(self.cores[k].shape)} "
                    f"then {tuple(self.cores[k + 1].shape)}"
                )

    @classmethod
    def random(cls, shape: Sequence[int], rank: int | Sequence[int], std: float = 1.0, generator=None,
               dtype=torch.float32) -> "TensorTrain":
        ranks = full_ranks(rank, len(shape))
        cores = [torch.randn(ranks[k], n, ranks[k + 1], generator=generator, dtype=dtype) * std
                 for k, n in enumerate(shape)]
        return cls(cores)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(core.shape[1] for core in self.cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1, *(core.shape[-1] for core in self.cores))

    @property
    def order(self) -> int:
        return len(self.cores)

    def num_params(self) -> int:
        return sum(core.numel() for core in self.cores)

    def to_dense(self) -> torch.Tensor:
        return to_dense(self.cores)


def _truncation_rank(singular_values: torch.Tensor, max_tail_norm: float, rank_cap: int) -> int:
    """Smallest rank whose discarded singular values have norm <= max_tail_norm, then capped."""
    # tail[k] = norm of singular values k, k+1, ...: keeping k values discards tail[k].
    squares = singular_values.double() ** 2
    tail = torch.flip(torch.cumsum(torch.flip(squares, [0]), 0), [0]).sqrt()
    tail = torch.cat([tail, tail.new_zeros(1)])
    rank = int(torch.nonzero(tail <= max_tail_norm)[0])
    return max(1, min(rank, rank_cap))


def tt_svd(tensor: torch.Tensor, max_rank: int | Sequence[int] | None = None,
           rel_error: float | None = None) -> TensorTrain:
    """TT-SVD (Oseledets 2011): sequential truncated SVDs.

    With ``rel_error`` = eps, each of the ``d - 1`` truncations discards at most
    ``eps / sqrt(d - 1) * ||A||_F``, so ``||A - TT||_F <= eps * ||A||_F``. ``max_rank`` (an int or
    one cap per interior bond) caps ranks further, which can break that bound. With neither, the
    result is exact (up to round-off). Computed in float64; cores come back in the input's dtype.
    """
    if tensor.dim() < 1:
        raise ValueError("tt_svd needs a tensor with at least one dimension")
    if rel_error is not None and rel_error < 0:
        raise ValueError(f"rel_error must be >= 0, got {rel_error}")
    shape = tuple(tensor.shape)
    order = len(shape)
    useful = max_useful_ranks(shape)
    if max_rank is None:
        caps = useful
    else:
        caps = full_ranks(max_rank, order)
    work = tensor.detach().to(torch.float64)
    norm = float(torch.linalg.norm(work))
    per_step = (rel_error or 0.0) * norm / math.sqrt(max(order - 1, 1))
    cores = []
    rank_left = 1
    remainder = work.reshape(rank_left * shape[0], -1)
    for k in range(order - 1):
        u, s, vh = torch.linalg.svd(remainder, full_matrices=False)
        rank = _truncation_rank(s, per_step, min(caps[k + 1], s.numel()))
        cores.append(u[:, :rank].reshape(rank_left, shape[k], rank))
        remainder = (s[:rank, None] * vh[:rank]).reshape(rank * shape[k + 1], -1)
        rank_left = rank
    cores.append(remainder.reshape(rank_left, shape[-1], 1))
    return TensorTrain([core.to(tensor.dtype) for core in cores])
