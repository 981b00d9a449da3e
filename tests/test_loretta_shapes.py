import math

import pytest
import torch

from ttpeft.loretta_shapes import (
    auto_matrix_shape,
    check_matrix_shape,
    factor_shape,
    head_shape,
    row_split,
    side_factors,
)
from ttpeft.shapes import prime_factors
from ttpeft.tensor_train import tt_num_params
from ttpeft.tuners.loretta_common import tt_weight, tt_weight_factors


@pytest.mark.parametrize("width, bottleneck, shape", [
    (768, 8, (8, 8, 12, 8)),
    (1024, 8, (4, 8, 8, 8, 4)),
    (4096, 8, (16, 16, 8, 4, 4)),
    (768, 64, (8, 8, 12, 8, 8)),
    (1024, 64, (4, 8, 8, 8, 8, 4)),
    (4096, 64, (16, 16, 16, 4, 4, 4)),
])
def test_published_factor_shapes_are_the_default(width, bottleneck, shape):
    assert factor_shape(width, bottleneck, width_first=True) == shape
    assert factor_shape(width, bottleneck, width_first=False) == shape


def test_published_classifier_shape_for_768():
    assert head_shape(768, 768) == (8, 8, 12, 12, 8, 8)


def test_published_parameter_counts_for_768():
    # 580 per factor and 1,160 per target layer for r = 8 at tensor rank 5 (LoRA r = 8: 12,288)
    assert tt_num_params(factor_shape(768, 8), 5) == 580
    assert 2 * tt_num_params(factor_shape(768, 8), 5) == 1160
    assert tt_num_params(head_shape(768, 768), 5) == 1080


@pytest.mark.parametrize("width", [1, 2, 7, 97, 384, 576, 1000, 3072, 4097, 4099, 5120, 8192, 11008])
@pytest.mark.parametrize("bottleneck", [8, 64])
def test_any_width_is_factorised_exactly(width, bottleneck):
    for shape, rows in ((factor_shape(width, bottleneck, True), width),
                        (factor_shape(width, bottleneck, False), bottleneck)):
        assert math.prod(shape) == width * bottleneck
        assert all(n >= 1 for n in shape)
        if width not in (5120, 8192):  # published shapes may straddle the row/column boundary
            assert row_split(shape, rows) is not None


@pytest.mark.parametrize("width, bottleneck", [(384, 8), (576, 8), (768, 8), (4096, 64), (97, 8)])
@pytest.mark.parametrize("cores", [1, 2, 3])
def test_a_core_count_overrides_the_published_shape_and_mirrors_for_the_second_factor(width, bottleneck, cores):
    first = factor_shape(width, bottleneck, width_first=True, cores=cores)
    second = factor_shape(width, bottleneck, width_first=False, cores=cores)
    assert math.prod(first) == width * bottleneck and second == tuple(reversed(first))
    assert len(first) == min(cores, len(prime_factors(width * bottleneck)))
    assert list(first) == sorted(first, reverse=True)


def test_two_cores_are_the_most_balanced_split():
    assert factor_shape(384, 8, cores=2) == (64, 48)  # not (8, 8, 6, 8), the automatic 4-core shape
    assert factor_shape(768, 8, cores=2) == (96, 64)  # not the published (8, 8, 12, 8)


@pytest.mark.parametrize("cores", [0, -1, 1.5, True, "2"])
def test_an_invalid_core_count_is_an_error(cores):
    with pytest.raises(ValueError, match="tensor_cores=.*valid: None or an int >= 1"):
        factor_shape(384, 8, cores=cores)


def test_auto_shapes_put_large_factors_at_the_ends():
    assert auto_matrix_shape(1000, 8) == (10, 10, 10, 8)
    assert auto_matrix_shape(8, 1000) == (8, 10, 10, 10)
    assert auto_matrix_shape(4097, 8) == (241, 17, 8)  # 4097 = 17 x 241
    assert side_factors(4099) == (4099,)  # prime: one core


@pytest.mark.parametrize("shape, rows", [((8, 8, 12, 8), 768), ((4, 8, 8, 8, 4), 1024), ((241, 17, 8), 4097)])
def test_weight_factors_are_thin_and_multiply_to_the_reshaped_train(shape, rows):
    torch.manual_seed(0)
    cores = [torch.randn(r0, n, r1, dtype=torch.float64)
             for r0, n, r1 in zip((1, 5, 5, 5, 5), shape, (5,) * (len(shape) - 1) + (1,))]
    full = cores[0]
    for core in cores[1:]:
        full = torch.tensordot(full, core, dims=([-1], [0]))
    expected = full.reshape(rows, -1)  # row-major reshape, as the published code
    factors = tt_weight_factors(cores, rows)
    product = factors[0] if len(factors) == 1 else factors[0] @ factors[1]
    torch.testing.assert_close(product, expected)
    torch.testing.assert_close(tt_weight(cores, rows), expected)
    assert all(min(f.shape) <= max(5, math.prod(shape) // rows) for f in factors)


def test_check_matrix_shape_names_option_value_and_what_is_valid():
    with pytest.raises(ValueError) as err:
        check_matrix_shape([8, 8, 8], 768, 8, "LoRETTA_rep on 'q'", "a_tensor_shape")
    message = str(err.value)
    assert "'q'" in message and "a_tensor_shape=[8, 8, 8]" in message and "6144" in message
