"""Factorising dimensions and choosing tensor-train shapes for a layer."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from .tensor_train import full_ranks, max_useful_ranks, tt_num_params


def prime_factors(n: int) -> list[int]:
    """Prime factors of ``n`` in ascending order, with multiplicity (``[]`` for 1)."""
    if n < 1:
        raise ValueError(f"can only factorise integers >= 1, got {n}")
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


@lru_cache(maxsize=4096)
def _factorisations(n: int, count: int, smallest: int) -> tuple[tuple[int, ...], ...]:
    """All non-decreasing tuples of ``count`` factors >= ``smallest`` (each > 1) with product ``n``."""
    if count == 1:
        return ((n,),) if n >= smallest else ()
    found = []
    d = smallest
    while d ** count <= n:
        if n % d == 0:
            found.extend((d, *rest) for rest in _factorisations(n // d, count - 1, d))
        d += 1
    return tuple(found)


def factorisations(n: int, count: int) -> list[tuple[int, ...]]:
    """Every way to write ``n`` as ``count`` factors > 1, each as a non-decreasing tuple.

    Empty when ``n`` has fewer than ``count`` prime factors. ``n = 1`` has the single
    factorisation ``(1,)``.
    """
    if n < 1 or count < 1:
        raise ValueError(f"need n >= 1 and count >= 1, got n={n}, count={count}")
    if n == 1:
        return [(1,)] if count == 1 else []
    return list(_factorisations(n, count, 2))


def balanced_factors(n: int, count: int) -> tuple[int, ...]:
    """``n`` as ``count`` factors as equal as possible (smallest sum, then smallest largest factor).

    When ``n`` has fewer than ``count`` prime factors, fewer factors are returned: all of its
    prime factors, so a prime ``p`` gives ``(p,)`` and 1 gives ``(1,)``. Result is descending.
    """
    if n < 1 or count < 1:
        raise ValueError(f"need n >= 1 and count >= 1, got n={n}, count={count}")
    count = min(count, max(1, len(prime_factors(n))))
    candidates = factorisations(n, count)
    best = min(candidates, key=lambda f: (sum(f), max(f)))
    return tuple(sorted(best, reverse=True))


def factorisation_note(n: int, count: int) -> str | None:
    """A sentence saying what a requested factor count cannot do for ``n``, or None when it can."""
    available = len(prime_factors(n))
    if available >= count:
        return None
    if available <= 1:
        return (f"{n} is {'1' if n == 1 else 'prime'}: it cannot be split into {count} factors, so its side of "
                f"the train is a single core of {n} x rank entries (no compression on that side)")
    return (f"{n} has only {available} prime factors ({' x '.join(map(str, prime_factors(n)))}), "
            f"so it gets {available} factors instead of {count}")


def ttlora_candidate_shapes(in_features: int, out_features: int, factors_per_side: int):
    """TT-LoRA shapes: the input side descending, the output side its mirror (large factors at the
    ends, where a core costs ``n * r`` instead of ``n * r^2``)."""
    in_count = min(factors_per_side, max(1, len(prime_factors(in_features))))
    out_count = min(factors_per_side, max(1, len(prime_factors(out_features))))
    for fin in factorisations(in_features, in_count):
        for fout in factorisations(out_features, out_count):
            yield tuple(sorted(fin, reverse=True)), tuple(sorted(fout))


def auto_ttlora_shape(in_features: int, out_features: int, rank: int | Sequence[int],
                      factors_per_side: int = 3) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The TT-LoRA shape ``(input factors, output factors)`` with the fewest parameters at ``rank``.

    Only shapes whose every bond can hold the requested rank are considered; when none can, the
    shape with the most room is returned and the caller's rank check says what is valid.
    """
    best, best_key = None, None
    for fin, fout in ttlora_candidate_shapes(in_features, out_features, factors_per_side):
        shape = fin + fout
        try:
            ranks = full_ranks(rank, len(shape))
        except ValueError:
            continue  # a per-bond list written for another number of cores
        room = max_useful_ranks(shape)
        fits = all(r <= u for r, u in zip(ranks, room))
        key = (not fits, tt_num_params(shape, ranks), max(shape) - min(shape))
        if best_key is None or key < best_key:
            best, best_key = (fin, fout), key
    if best is None:
        raise ValueError(
            f"no TT-LoRA shape for a {in_features} -> {out_features} layer with {factors_per_side} factors per "
            f"side fits the per-bond rank list {rank!r}; pass tt_shape explicitly"
        )
    return best


def check_ttlora_ranks(shape: Sequence[int], rank: int | Sequence[int], where: str) -> tuple[int, ...]:
    """Full ranks for a TT-LoRA train, or a ValueError saying which bond is out of range."""
    try:
        ranks = full_ranks(rank, len(shape))
    except ValueError as err:
        raise ValueError(f"{where}: tt_rank={rank!r} is invalid for tt_shape {tuple(shape)}: {err}") from None
    room = max_useful_ranks(shape)
    for bond in range(1, len(shape)):
        if ranks[bond] > room[bond]:
            raise ValueError(
                f"{where}: tt_rank={rank!r} gives bond {bond} of tt_shape {tuple(shape)} rank {ranks[bond]}, "
                f"larger than useful (at most {room[bond]} there; valid per-bond maxima: {room[1:-1]})"
            )
    return ranks


def describe_factorisation(n: int) -> str:
    """Human-readable prime factorisation, e.g. ``'2^7 x 3'``."""
    primes = prime_factors(n)
    if not primes:
        return "1"
    parts = []
    for p in sorted(set(primes)):
        k = primes.count(p)
        parts.append(f"{p}^{k}" if k > 1 else str(p))
    return " x ".join(parts)


def is_prime(n: int) -> bool:
    return n > 1 and prime_factors(n) == [n]


__all__ = [
    "auto_ttlora_shape",
    "balanced_factors",
    "check_ttlora_ranks",
    "describe_factorisation",
    "factorisation_note",
    "factorisations",
    "is_prime",
    "prime_factors",
]
