"""Tensor shapes for LoRETTA's tensorised layers, for any layer width.

LoRETTA stores a ``rows x cols`` weight (LoRA's A or B, an adapter's down or up projection, or the
classifier head's dense layer) as a tensor train over a factorisation of ``rows * cols``; the dense
matrix is the row-major reshape of the train. The published code only knows the widths in the tables
below. For those the published shape is used, so parameter counts match the papers; any other width is
factorised here, with the row factors first so the train splits into two thin factors at one bond.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .shapes import balanced_factors, prime_factors

# Published shapes for a ``width x bottleneck`` (or ``bottleneck x width``) weight, keyed by the
# bottleneck (LoRA rank r, or adapter bottleneck) and then by the layer width.
PUBLISHED_FACTOR_SHAPES: dict[int, dict[int, tuple[int, ...]]] = {
    5: {768: (5, 8, 12, 8), 1024: (4, 8, 5, 8, 4), 1280: (4, 8, 5, 8, 5), 1536: (4, 8, 5, 8, 6),
        1600: (5, 8, 5, 8, 5), 2304: (5, 8, 8, 4, 9), 4096: (16, 16, 5, 4, 4), 5120: (5, 8, 10, 8, 8),
        8192: (4, 16, 16, 10, 4)},
    8: {768: (8, 8, 12, 8), 1024: (4, 8, 8, 8, 4), 1280: (4, 8, 8, 8, 5), 1536: (4, 8, 8, 8, 6),
        1600: (5, 8, 8, 8, 5), 2304: (8, 8, 8, 4, 9), 4096: (16, 16, 8, 4, 4), 5120: (8, 8, 10, 8, 8),
        8192: (4, 16, 16, 16, 4)},
    16: {768: (8, 16, 12, 8), 1024: (4, 8, 16, 8, 4), 1280: (4, 8, 16, 8, 5), 1536: (4, 8, 16, 8, 6),
         1600: (5, 8, 16, 8, 5), 2304: (8, 8, 8, 8, 9), 4096: (16, 16, 16, 4, 4), 5120: (8, 16, 10, 8, 8),
         8192: (4, 16, 16, 16, 8)},
    32: {768: (4, 8, 12, 8, 8), 1024: (4, 8, 16, 8, 4), 1280: (4, 8, 16, 8, 5), 1536: (4, 8, 16, 8, 6),
         1600: (5, 8, 16, 8, 5), 2304: (8, 8, 16, 8, 9), 4096: (16, 16, 16, 4, 4), 5120: (8, 16, 10, 8, 8),
         8192: (4, 16, 16, 16, 8)},
    64: {768: (8, 8, 12, 8, 8), 1024: (4, 8, 8, 8, 8, 4), 1280: (4, 8, 8, 8, 8, 5), 1536: (4, 8, 8, 8, 8, 6),
         1600: (5, 8, 8, 8, 8, 5), 2304: (8, 8, 8, 8, 8, 9), 4096: (16, 16, 16, 4, 4, 4),
         5120: (5, 8, 8, 16, 8, 8), 8192: (4, 16, 16, 16, 8, 4)},
    128: {768: (8, 16, 12, 8, 8), 1024: (4, 8, 16, 8, 8, 4), 1280: (4, 8, 16, 8, 8, 5),
          1536: (4, 8, 16, 8, 8, 6), 1600: (5, 8, 16, 8, 8, 5), 4096: (16, 16, 16, 8, 4, 4),
          5120: (5, 8, 16, 16, 8, 8), 8192: (4, 16, 16, 16, 16, 4)},
}

# Published shapes of the tensorised classifier head (a ``width x width`` dense layer).
PUBLISHED_HEAD_SHAPES: dict[int, tuple[int, ...]] = {
    768: (8, 8, 12, 12, 8, 8),
    1024: (4, 8, 8, 16, 8, 8, 4),
    1280: (4, 4, 8, 8, 8, 8, 5, 5),
    1536: (4, 4, 8, 8, 8, 8, 6, 6),
    1600: (5, 5, 8, 8, 8, 8, 5, 5),
    2304: (4, 4, 8, 8, 8, 8, 9, 9),
    4096: (4, 4, 16, 16, 16, 16, 4, 4),
    5120: (8, 8, 8, 10, 10, 8, 8),
    8192: (4, 4, 16, 16, 16, 16, 8, 8),
}

DEFAULT_FACTOR_SIZE = 8


def side_factors(n: int, factor_size: int = DEFAULT_FACTOR_SIZE) -> tuple[int, ...]:
    """``n`` as factors close to ``factor_size``, descending (a prime ``n`` stays one factor)."""
    if n < 1:
        raise ValueError(f"cannot factorise a dimension of {n}")
    if n == 1:
        return (1,)
    count = max(1, round(math.log(n) / math.log(factor_size)))
    return balanced_factors(n, min(count, len(prime_factors(n))))


def auto_matrix_shape(rows: int, cols: int, factor_size: int = DEFAULT_FACTOR_SIZE) -> tuple[int, ...]:
    """A train shape for a ``rows x cols`` matrix: row factors (descending) then column factors
    (ascending), so the large factors sit at the two ends, where a core costs ``n * rank`` instead of
    ``n * rank^2``, and the train splits into thin ``rows x rank`` and ``rank x cols`` factors."""
    return side_factors(rows, factor_size) + tuple(sorted(side_factors(cols, factor_size)))


def check_tensor_cores(cores, where: str = "") -> None:
    """A ValueError naming ``where`` (a config class) unless ``cores`` is None or an int >= 1."""
    if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}tensor_cores={cores!r} is invalid; valid: None or an int >= 1, e.g. 2 "
                         "(None: the published shape, or factors near 8)")


def factor_shape(width: int, bottleneck: int, width_first: bool = True,
                 factor_size: int = DEFAULT_FACTOR_SIZE, cores: int | None = None) -> tuple[int, ...]:
    """Train shape of a ``width x bottleneck`` weight (``width_first``) or a ``bottleneck x width`` one.

    With ``cores``, ``width * bottleneck`` split into that many balanced factors (descending for
    ``width_first``, ascending for its mirror; fewer when the size has fewer prime factors). Otherwise
    the published shape where the reference has one (the same for both directions), else the automatic
    factorisation.
    """
    if cores is not None:
        check_tensor_cores(cores)
        factors = balanced_factors(width * bottleneck, cores)
        return factors if width_first else tuple(reversed(factors))
    published = PUBLISHED_FACTOR_SHAPES.get(bottleneck, {}).get(width)
    if published is not None:
        return published
    if width_first:
        return auto_matrix_shape(width, bottleneck, factor_size)
    return auto_matrix_shape(bottleneck, width, factor_size)


def head_shape(in_features: int, out_features: int, factor_size: int = DEFAULT_FACTOR_SIZE) -> tuple[int, ...]:
    """Train shape of the tensorised classifier head's dense layer (published where known)."""
    if in_features == out_features and in_features in PUBLISHED_HEAD_SHAPES:
        return PUBLISHED_HEAD_SHAPES[in_features]
    return auto_matrix_shape(in_features, out_features, factor_size)


def row_split(shape: Sequence[int], rows: int) -> int | None:
    """Number of leading cores (at least one, leaving at least one) whose sizes multiply to ``rows``,
    or None when no such prefix exists."""
    product = 1
    for k, n in enumerate(shape[:-1]):
        product *= n
        if product == rows:
            return k + 1
    return None


def check_matrix_shape(shape: Sequence[int], rows: int, cols: int, where: str, option: str) -> tuple[int, ...]:
    """Validate a user-given train shape for a ``rows x cols`` weight, or raise a ValueError saying what fits."""
    try:
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {option}={shape!r} is not a sequence of ints; valid: positive ints "
                         f"multiplying to {rows} x {cols} = {rows * cols}") from None
    if not shape or any(n < 1 for n in shape) or math.prod(shape) != rows * cols:
        raise ValueError(
            f"{where}: {option}={list(shape)} multiplies to {math.prod(shape) if shape else 0}, but the weight is "
            f"{rows} x {cols} = {rows * cols}; valid: positive ints multiplying to {rows * cols}, e.g. "
            f"{list(auto_matrix_shape(rows, cols))} (or None to derive one)"
        )
    return shape


__all__ = [
    "PUBLISHED_FACTOR_SHAPES",
    "PUBLISHED_HEAD_SHAPES",
    "auto_matrix_shape",
    "check_matrix_shape",
    "check_tensor_cores",
    "factor_shape",
    "head_shape",
    "row_split",
    "side_factors",
]
