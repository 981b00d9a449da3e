import math

import pytest

from ttpeft.shapes import (
    auto_ttlora_shape,
    balanced_factors,
    check_ttlora_ranks,
    factorisation_note,
    factorisations,
    prime_factors,
)
from ttpeft.tensor_train import max_useful_ranks, tt_num_params


@pytest.mark.parametrize("n", list(range(1, 300)) + [384, 576, 768, 1000, 4096, 4097, 4099, 5120, 8192, 11008])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_balanced_factors_multiply_back_for_every_integer(n, count):
    factors = balanced_factors(n, count)
    assert math.prod(factors) == n
    assert len(factors) == min(count, max(1, len(prime_factors(n))))
    assert list(factors) == sorted(factors, reverse=True)
    if n > 1:
        assert all(f > 1 for f in factors)


def test_balanced_factors_are_the_most_balanced():
    assert balanced_factors(4096, 3) == (16, 16, 16)
    assert sorted(balanced_factors(768, 3)) == [8, 8, 12]
    for n, count in [(768, 3), (1000, 3), (6144, 4), (360, 3)]:
        best = min(sum(f) for f in factorisations(n, count))
        assert sum(balanced_factors(n, count)) == best


def test_primes_and_one_have_a_single_factor_and_an_explanation():
    assert balanced_factors(7, 3) == (7,)
    assert balanced_factors(4099, 2) == (4099,)
    assert balanced_factors(1, 3) == (1,)
    assert "prime" in factorisation_note(4099, 3)
    assert "only 2 prime factors" in factorisation_note(4097, 3)
    assert factorisation_note(768, 3) is None


def test_prime_factors():
    assert prime_factors(768) == [2] * 8 + [3]
    assert prime_factors(1) == []
    with pytest.raises(ValueError):
        prime_factors(0)


@pytest.mark.parametrize("in_features,out_features", [(384, 384), (768, 768), (576, 1536), (1000, 4097), (4099, 7)])
def test_auto_ttlora_shape_fits_layer_and_rank(in_features, out_features):
    in_factors, out_factors = auto_ttlora_shape(in_features, out_features, 5)
    assert math.prod(in_factors) == in_features and math.prod(out_factors) == out_features
    shape = in_factors + out_factors
    if min(max_useful_ranks(shape)[1:-1]) >= 5:
        check_ttlora_ranks(shape, 5, "layer")


def test_auto_ttlora_shape_is_no_larger_than_the_published_shape():
    in_factors, out_factors = auto_ttlora_shape(768, 768, 5)
    assert tt_num_params(in_factors + out_factors, 5) <= 990


def test_rank_checks_name_the_bond_and_the_valid_maximum():
    with pytest.raises(ValueError, match=r"bond 1 .*at most 3"):
        check_ttlora_ranks((3, 4, 4, 3), 5, "TT-LoRA on 'q'")
    with pytest.raises(ValueError, match="interior bonds"):
        check_ttlora_ranks((3, 4, 4, 3), [2, 2], "TT-LoRA on 'q'")
