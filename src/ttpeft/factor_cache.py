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

from .tensor_train import contract_cores

_forward_ids = itertools.count(1)
_current_forward_id = 0


def begin_forward() -> int:
    """Start a new model forward: factors built with gradients for earlier forwards become stale."""
    global _current_forward_id
    _current_forward_id = next(_forward_ids)
    return _current_forward_id


def core_list(cores: torch.nn.ParameterList) -> list[torch.Tensor]:
    """The cores held by a ParameterList, read from its parameter dict: its own iteration goes through
    ``__getattr__`` for every core, a cost paid per layer and per forward on the hot path."""
    return list(cores._parameters.values())


def factor_dtype(layer: torch.nn.Module, cores: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype the thin factors are built in: the base layer's weight dtype when it is a float."""
    weight = getattr(layer.base_layer, "weight", None)
    if weight is None:
        weight = layer.get_base_layer().weight
    return weight.dtype if weight.dtype.is_floating_point else cores[0].dtype


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
class TTFactorsRef:
    """Two thin factors to build from cores: ``L = contract(left_cores)`` as ``rows x r`` and
    ``R = contract(right_cores)`` as ``r x cols``, scaled by ``col_scale`` and cast to ``out_dtype``.

    For TT-LoRA the two core lists are the halves of one train split at its middle bond; for
    LoRETTA_rep they are the trains of A and B; for LoRETTA_adp those of the down and up projections.
    """

    cache: "FactorCache"
    name: str
    left_cores: Sequence[torch.Tensor]
    right_cores: Sequence[torch.Tensor]
    rows: int
    out_dtype: torch.dtype
    col_scale: float = 1.0

    @property
    def cores(self) -> list[torch.Tensor]:
        return [*self.left_cores, *self.right_cores]


def build_factors(ref: TTFactorsRef) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of one ref, built alone (no stacking)."""
    row_factor = contract_cores(list(ref.left_cores)).reshape(ref.rows, -1)
    col_factor = contract_cores(list(ref.right_cores)).reshape(row_factor.shape[1], -1)
    if ref.col_scale != 1.0:
        col_factor = col_factor * ref.col_scale
    return row_factor.to(ref.out_dtype), col_factor.to(ref.out_dtype)


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

    def factors(self, ref: TTFactorsRef) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached factors, or factors built for this layer alone (and cached)."""
        if torch.compiler.is_compiling():
            # Traced graphs build the factors inline (the compiler fuses them); the cache's Python
            # state would only add guards and recompilations.
            return build_factors(ref)
        found = self.lookup(ref.name, ref.cores)
        if found is not None:
            return found
        factors = build_factors(ref)
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


def build_grouped(refs: Iterable[TTFactorsRef]) -> int:
    """Build and cache the factors of every ref that has none, one batched chain per shape.

    Returns the number of groups built (each a fixed handful of kernels).
    """
    groups: dict[tuple, list[TTFactorsRef]] = defaultdict(list)
    for ref in refs:
        cores = ref.cores
        if ref.cache.lookup(ref.name, cores) is not None:
            continue
        key = (tuple(tuple(c.shape) for c in cores), len(ref.left_cores), ref.rows, cores[0].dtype,
               cores[0].device, ref.out_dtype, _needs_grad(cores))
        groups[key].append(ref)
    for members in groups.values():
        if len(members) == 1:
            members[0].cache.factors(members[0])
            continue
        count, rows = len(members), members[0].rows
        left = _stacked_chain([torch.stack(cores) for cores in zip(*(m.left_cores for m in members))])
        right = _stacked_chain([torch.stack(cores) for cores in zip(*(m.right_cores for m in members))])
        left = left.reshape(count, rows, -1)  # (L, rows, r)
        right = right.reshape(count, left.shape[-1], -1)  # (L, r, cols)
        scales = [m.col_scale for m in members]
        if len(set(scales)) == 1:  # the usual case: a Python scalar, no host-to-device copy (a sync point)
            right = right * scales[0] if scales[0] != 1.0 else right
        else:
            right = right * torch.tensor(scales, dtype=right.dtype, device=right.device).view(-1, 1, 1)
        out_dtype = members[0].out_dtype
        # unbind (not indexing): its backward is a single stack of the per-layer gradients.
        for member, row_factor, col_factor in zip(members, left.to(out_dtype).unbind(0),
                                                  right.to(out_dtype).unbind(0)):
            member.cache.store(member.name, member.cores, (row_factor, col_factor))
    return len(groups)


def prepare_factors(layers: Iterable, adapter_names: Sequence[str] | None = None) -> int:
    """Model pre-forward hook body: new forward id, then grouped factors for every layer's refs (of its
    active adapters, or of ``adapter_names``)."""
    if torch.compiler.is_compiling():
        return 0  # layers build their factors inline in compiled graphs
    begin_forward()
    layers = list(layers)
    names = None if adapter_names is None else list(adapter_names)
    refs = [ref for layer in layers for ref in layer.factor_refs_to_prepare(names)]
    evict_unused(layers, refs)
    return build_grouped(refs) if refs else 0


def evict_unused(layers: Sequence, refs: Sequence[TTFactorsRef]) -> None:
    """Drop cached factors this forward does not use (adapters switched away from): with many adapters
    loaded, only those in use hold factors (a TT adapter's factors are several times its cores)."""
    wanted: dict[int, set[str]] = defaultdict(set)
    for ref in refs:
        wanted[id(ref.cache)].add(ref.name)
    for layer in layers:
        cache = getattr(layer, "factor_cache", None)
        if cache is not None and cache.entries:
            keep = wanted.get(id(cache), ())
            for name in [name for name in cache.entries if name not in keep]:
                del cache.entries[name]
