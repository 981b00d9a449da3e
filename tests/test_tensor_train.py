import numpy as np
import pytest
import torch

from ttpeft.tensor_train import (
    TensorTrain,
    contract_cores,
    frobenius_norm,
    full_ranks,
    max_useful_ranks,
    to_dense,
    tt_num_params,
    tt_svd,
)
from ttpeft.tt_matrix import init_tt_matrix_cores, thin_factors, tt_matrix_dense


def einsum_dense(cores):
    """Reference reconstruction: one explicit einsum over every core."""
    letters = "abcdefghij"
    bonds = "ABCDEFGHIJK"
    terms = [f"{bonds[k]}{letters[k]}{bonds[k + 1]}" for k in range(len(cores))]
    out = letters[: len(cores)]
    dense = torch.einsum(",".join(terms) + f"->{bonds[0]}{out}{bonds[len(cores)]}", *cores)
    return dense[0, ..., 0]


@pytest.mark.parametrize("shape,rank", [((5,), 1), ((3, 4), 2), ((2, 3, 4), [2, 3]), ((4, 2, 3, 5, 2), 3)])
def test_dense_reconstruction_matches_einsum(shape, rank):
    tt = TensorTrain.random(shape, rank, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert tt.shape == shape
    assert torch.allclose(tt.to_dense(), einsum_dense(tt.cores))
    assert tt.num_params() == tt_num_params(shape, rank)


@pytest.mark.parametrize("shape,rank", [((5,), 1), ((3, 4), 2), ((4, 2, 3, 5, 2), 3)])
def test_frobenius_norm_from_the_cores_is_the_dense_tensors(shape, rank):
    tt = TensorTrain.random(shape, rank, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(frobenius_norm(tt.cores), torch.linalg.vector_norm(tt.to_dense()))


def test_parameter_count_formula():
    # DESIGN §2: the published 768-wide TT-LoRA shape at rank 5 has 990 parameters.
    assert tt_num_params((64, 4, 3, 3, 4, 64), 5) == 990
    assert tt_num_params((2, 3, 4), [2, 5]) == 1 * 2 * 2 + 2 * 3 * 5 + 5 * 4 * 1


def test_full_ranks_accepts_int_interior_list_and_bounded_list():
    assert full_ranks(3, 4) == (1, 3, 3, 3, 1)
    assert full_ranks([2, 3, 4], 4) == (1, 2, 3, 4, 1)
    assert full_ranks([1, 2, 3, 4, 1], 4) == (1, 2, 3, 4, 1)
    with pytest.raises(ValueError, match="interior bonds"):
        full_ranks([2, 3], 4)
    with pytest.raises(ValueError, match=">= 1"):
        full_ranks(0, 3)
    with pytest.raises(ValueError, match="boundary"):
        full_ranks([2, 2, 3, 4, 1], 4)


def test_max_useful_ranks():
    assert max_useful_ranks((2, 3, 4)) == (1, 2, 4, 1)


def test_tt_svd_is_exact_at_full_rank():
    tensor = torch.randn(3, 4, 5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tt = tt_svd(tensor)
    assert tt.ranks == max_useful_ranks(tensor.shape)
    assert torch.allclose(tt.to_dense(), tensor, atol=1e-10)


def test_tt_svd_of_matrix_equals_best_low_rank_approximation():
    # For two cores, TT-SVD is a truncated SVD: its error is the Eckart-Young optimum from numpy.
    matrix = np.random.default_rng(2).standard_normal((12, 9))
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    for rank in (1, 3, 8):
        tt = tt_svd(torch.from_numpy(matrix), max_rank=rank)
        error = np.linalg.norm(tt.to_dense().numpy() - matrix)
        assert tt.ranks == (1, rank, 1)
        assert error == pytest.approx(np.sqrt(np.sum(singular_values[rank:] ** 2)), rel=1e-9)


@pytest.mark.parametrize("eps", [0.5, 0.2, 0.05, 0.01])
def test_tt_svd_respects_relative_error_bound(eps):
    generator = torch.Generator().manual_seed(3)
    low_rank = TensorTrain.random((4, 5, 6, 3), 2, generator=generator, dtype=torch.float64).to_dense()
    tensor = low_rank + 0.05 * torch.randn(low_rank.shape, generator=generator, dtype=torch.float64)
    tt = tt_svd(tensor, rel_error=eps)
    error = torch.linalg.norm(tt.to_dense() - tensor) / torch.linalg.norm(tensor)
    assert error <= eps + 1e-12
    if eps >= 0.2:  # loose bounds keep only the low-rank part: fewer numbers than the dense tensor
        assert tt.num_params() < tensor.numel()


def test_tt_svd_rank_cap_per_bond_and_combined_with_error():
    tensor = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tt = tt_svd(tensor, max_rank=[2, 3, 2])
    assert tt.ranks == (1, 2, 3, 2, 1)
    loose = tt_svd(tensor, max_rank=3, rel_error=0.9)
    assert max(loose.ranks) <= 3


def test_tt_svd_rejects_negative_error():
    with pytest.raises(ValueError, match="rel_error"):
        tt_svd(torch.ones(2, 2), rel_error=-0.1)


def test_tensor_train_validates_cores():
    with pytest.raises(ValueError, match="bond"):
        TensorTrain([torch.ones(1, 2, 3), torch.ones(2, 2, 1)])
    with pytest.raises(ValueError, match="boundary"):
        TensorTrain([torch.ones(2, 2, 1)])


def test_thin_factors_reproduce_the_dense_tt_matrix():
    # A TT matrix over (p1, p2 | q1, q2) is the (p1 p2) x (q1 q2) reshape of the dense tensor.
    tt = TensorTrain.random((3, 4, 2, 5), [2, 3, 2], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    row_factor, col_factor = thin_factors(tt.cores, 2)
    assert row_factor.shape == (12, 3) and col_factor.shape == (3, 10)
    assert torch.allclose(row_factor @ col_factor, einsum_dense(tt.cores).reshape(12, 10))
    assert torch.allclose(tt_matrix_dense(tt.cores, 2), to_dense(tt.cores).reshape(12, 10))
    assert contract_cores(tt.cores).shape == (120, 1)


def test_zero_init_starts_at_zero_and_every_core_trains_from_the_second_step():
    torch.manual_seed(0)
    cores = [c.requires_grad_() for c in init_tt_matrix_cores([16, 24, 24, 16], [1, 3, 3, 3, 1], 2, zero_last=True)]
    x, target = torch.randn(8, 384), torch.randn(8, 384)

    def step():
        for core in cores:
            core.grad = None
        (x @ tt_matrix_dense(cores, 2) - target).pow(2).mean().backward()
        return [float(core.grad.abs().max()) for core in cores]

    assert float(tt_matrix_dense(cores, 2).abs().max()) == 0.0
    first = step()
    assert first[:-1] == [0.0, 0.0, 0.0] and first[-1] > 0  # as LoRA's A behind B = 0
    with torch.no_grad():
        for core in cores:
            core -= 0.1 * core.grad
    assert all(g > 0 for g in step())


def test_balanced_init_rescales_the_same_cores_to_one_entry_scale():
    # The same draws as the default, each random core rescaled to one common scale: the prefix product the
    # zero core is trained against (so ΔW's first steps) does not change, only the gauge Adam sees.
    shape, ranks = [24, 16, 16, 24], [1, 3, 3, 3, 1]
    default = init_tt_matrix_cores(shape, ranks, 2, zero_last=True, generator=torch.Generator().manual_seed(3))
    balanced = init_tt_matrix_cores(shape, ranks, 2, zero_last=True, generator=torch.Generator().manual_seed(3),
                                    balanced=True)
    default_stds = [float(core.std()) for core in default[:-1]]
    balanced_stds = [float(core.std()) for core in balanced[:-1]]
    assert max(default_stds) / min(default_stds) > 3  # row cores far smaller than the column core
    assert max(balanced_stds) / min(balanced_stds) < 1.25
    for b, d in zip(balanced[:-1], default[:-1]):
        ratio = b / d
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))  # a rescaled copy, not new draws
    assert float(balanced[-1].abs().max()) == 0.0
    assert torch.allclose(contract_cores(balanced[:-1]), contract_cores(default[:-1]), atol=1e-6)
