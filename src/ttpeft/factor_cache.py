"""Thin factors of TT matrices: built once per forward for the whole model, cached while unchanged.

Each adapted layer owns a :class:`FactorCache`. Before the model's forward, :func:`prepare_factors`
builds the thin factors of every TT matrix that needs them, stacking all matrices of the same shape
and contracting them with batched matmuls (a fixed handful of kernels per shape for the whole model
instead of a handful per layer). With gradients on, factors are valid for that forward only (and its
gradient-checkpointing recomputation); without, they stay valid until a core changes (optimiser
step, ``load_state_dict``, ``.to()``), detected through the cores' version counters.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .tt_matrix import thin_factors

_forward_ids = itertools.count(1)
_current_forward_id = 0


def begin_forward() -> int:
    """Start a new model forward: factors built with gradients for earlier forwards become stale."""
    global _current_forward_id
    _current_forward_id = next(_forward_ids)
    return _current_forward_id


def _cores_state(cores: Sequence[torch.Tensor]) -> tuple:
    return tuple((c._version, c.data_ptr(), c.dtype, c.device) for c in cores)


def _needs_grad(cores: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(c.requires_grad for c in cores)


@dataclass
class _Entry:
    state: tuple
    forward_id: int | None  # None: built without gradients, reusable while the cores are unchanged
    factors: tuple[torch.Tensor, torch.Tensor]


@dataclass
class TTMatrixRef:
    """One TT matrix of a layer: its cores, how many carry the row index, and the factors' dtype/scale."""

    cache: "FactorCache"
    name: str
    cores: Sequence[torch.Tensor]
    num_row_cores: int
    out_dtype: torch.dtype
    col_scale: float = 1.0


class FactorCache:
    """Per-layer store of ``(A, B)`` factors keyed by TT-matrix name (e.g. the adapter name)."""

    def __init__(self):
        self.entries: dict[str, _Entry] = {}

    def lookup(self, name: str, cores: Sequence[torch.Tensor]):
        entry = self.entries.get(name)
        if entry is None or entry.state != _cores_state(cores):
            return None
        if _needs_grad(cores):
            return entry.factors if entry.forward_id == _current_forward_id else None
        return tuple(f.detach() for f in entry.factors) if entry.forward_id is not None else entry.factors

    def store(self, name: str, cores: Sequence[torch.Tensor], factors) -> None:
        with_grad = _needs_grad(cores)
        self.entries[name] = _Entry(_cores_state(cores), _current_forward_id if with_grad else None, factors)

    def factors(self, ref: TTMatrixRef) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached factors, or factors built for this layer alone (and cached)."""
        found = self.lookup(ref.name, ref.cores)
        if found is not None:
            return found
        row_factor, col_factor = thin_factors(list(ref.cores), ref.num_row_cores)
        if ref.col_scale != 1.0:
            col_factor = col_factor * ref.col_scale
        factors = (row_factor.to(ref.out_dtype), col_factor.to(ref.out_dtype))
        self.store(ref.name, ref.cores, factors)
        return factors

    def clear(self) -> None:
        self.entries.clear()


def _stacked_chain(stacks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Batched :func:`contract_cores`: stacks of shape ``(L, r_left, n, r_right)`` -> ``(L, rows, r_last)``."""
    count = stacks[0].shape[0]
    result = stacks[0].reshape(count, -1, stacks[0].shape[-1])
    for stack in stacks[1:]:
        _, r_left, n, r_right = stack.shape
        result = torch.bmm(result, stack.reshape(count, r_left, n * r_right)).reshape(count, -1, r_right)
    return result


def build_grouped(refs: Iterable[TTMatrixRef]) -> int:
    """Build and cache the factors of every ref that has none, one batched chain per shape.

    Returns the number of groups built (each a fixed handful of kernels).
    """
    groups: dict[tuple, list[TTMatrixRef]] = defaultdict(list)
    for ref in refs:
        if ref.cache.lookup(ref.name, ref.cores) is not None:
            continue
        first = ref.cores[0]
        key = (tuple(tuple(c.shape) for c in ref.cores), ref.num_row_cores, first.dtype, first.device,
               ref.out_dtype, _needs_grad(ref.cores))
        groups[key].append(ref)
    for members in groups.values():
        if len(members) == 1:
            members[0].cache.factors(members[0])
            continue
        order = len(members[0].cores)
        stacks = [torch.stack([m.cores[k] for m in members]) for k in range(order)]
        split = members[0].num_row_cores
        rows = _stacked_chain(stacks[:split])  # (L, in, r)
        bond = rows.shape[-1]
        cols = _stacked_chain(stacks[split:]).reshape(len(members), bond, -1)  # (L, r, out)
        scales = [m.col_scale for m in members]
        if any(s != 1.0 for s in scales):
            cols = cols * torch.tensor(scales, dtype=cols.dtype, device=cols.device).view(-1, 1, 1)
        out_dtype = members[0].out_dtype
        # unbind (not indexing): its backward is a single stack of the per-layer gradients.
        for member, row_factor, col_factor in zip(members, rows.to(out_dtype).unbind(0), cols.to(out_dtype).unbind(0)):
            member.cache.store(member.name, member.cores, (row_factor, col_factor))
    return len(groups)


def prepare_factors(layers: Iterable) -> int:
    """Model pre-forward hook body: new forward id, then grouped factors for every layer's TT matrices."""
    begin_forward()
    refs = [ref for layer in layers for ref in layer.tt_matrices_to_prepare()]
    return build_grouped(refs) if refs else 0
