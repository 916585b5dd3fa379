"""Stage C: TRQ definitions, invariances, timestep weights and module scores on small float64 inputs."""

import pytest
import torch

from slimdiff.analyze import module_scores, timestep_weights, trq, trq_from_energies, trq_qk, trq_vo

F64 = torch.float64


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _moment(samples):
    return samples.T @ samples / samples.shape[0]


def _anisotropic_moment(dim, seed, tokens=64):
    return _moment(_randn(tokens, dim, seed=seed) * torch.linspace(0.1, 3.0, dim, dtype=F64))


def test_trq_is_one_for_isotropic_input_and_scale_invariant():
    weight = _randn(5, 7, seed=0)
    assert float(trq(weight, 3.5 * torch.eye(7, dtype=F64))) == pytest.approx(1.0, rel=1e-12)
    moment = _anisotropic_moment(7, seed=1)
    rho = float(trq(weight, moment))
    assert rho != pytest.approx(1.0, rel=1e-3)
    assert float(trq(-4.0 * weight, 0.01 * moment)) == pytest.approx(rho, rel=1e-12)


def test_trq_matches_its_definition_and_the_energy_form_per_timestep():
    weight = _randn(5, 7, seed=2)
    samples = [_randn(40, 7, seed=10 + t) * torch.linspace(0.5, 2.0, 7, dtype=F64) ** t for t in range(3)]
    moments = torch.stack([_moment(x) for x in samples])
    rho = trq(weight, moments)
    assert rho.shape == (3,)
    for t, x in enumerate(samples):
        direct = (torch.trace(weight @ moments[t] @ weight.T) / torch.trace(moments[t])) / (weight.square().sum() / 7)
        assert float(rho[t]) == pytest.approx(float(direct), rel=1e-12)
    output_energy = torch.stack([(x @ weight.T).square().sum(1).mean() for x in samples])
    input_energy = torch.stack([x.square().sum(1).mean() for x in samples])
    torch.testing.assert_close(trq_from_energies(output_energy, input_energy, weight.square().sum(), 7), rho)


def test_trq_lies_between_the_extreme_eigenvalue_bounds():
    weight, moment = _randn(6, 8, seed=3), _anisotropic_moment(8, seed=4)
    eig = torch.linalg.eigvalsh(moment)
    rho = float(trq(weight, moment))
    assert 8 * eig[0] / eig.sum() <= rho <= 8 * eig[-1] / eig.sum()


HEADS, HEAD_DIM, CX, CY = 2, 3, 6, 5


def _trq_qk_from_moments(q_w, k_w, sigma_x, sigma_y):
    """trq_qk on the head Grams W^j Σ W^jᵀ and traces of full moments (what the Grams of projected tokens are)."""
    def grams(w, sigma):
        w = w.reshape(HEADS, HEAD_DIM, -1)
        return torch.einsum("hac,...cd,hbd->...hab", w, sigma, w)

    trace = lambda sigma: sigma.diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    return trq_qk(q_w, k_w, grams(q_w, sigma_x), grams(k_w, sigma_y), trace(sigma_x), trace(sigma_y), HEADS)


def test_trq_qk_matches_the_bilinear_definition_per_head():
    q_w, k_w = _randn(HEADS * HEAD_DIM, CX, seed=5), _randn(HEADS * HEAD_DIM, CY, seed=6)
    x, y = _randn(50, CX, seed=7) * torch.linspace(0.1, 3.0, CX, dtype=F64), _randn(30, CY, seed=8)
    sigma_x, sigma_y = _moment(x), _moment(y)
    expected = []
    for j in range(HEADS):
        m = q_w[j * HEAD_DIM:(j + 1) * HEAD_DIM].T @ k_w[j * HEAD_DIM:(j + 1) * HEAD_DIM]
        numerator = torch.trace(m.T @ sigma_x @ m @ sigma_y) / (torch.trace(sigma_x) * torch.trace(sigma_y))
        expected.append(numerator / (m.square().sum() / (CX * CY)))
    # as calibration computes it: Grams of the projected tokens (per head), traces as mean squared norms
    q, k = (x @ q_w.T).reshape(-1, HEADS, HEAD_DIM), (y @ k_w.T).reshape(-1, HEADS, HEAD_DIM)
    gram_q, gram_k = torch.einsum("nha,nhb->hab", q, q) / 50, torch.einsum("nha,nhb->hab", k, k) / 30
    rho = trq_qk(q_w, k_w, gram_q, gram_k, x.square().sum(1).mean(), y.square().sum(1).mean(), HEADS)
    assert float(rho) == pytest.approx(float(sum(expected) / HEADS), rel=1e-12)


def test_trq_qk_is_one_for_isotropic_inputs_scale_invariant_and_vectorised():
    q_w, k_w = _randn(HEADS * HEAD_DIM, CX, seed=9), _randn(HEADS * HEAD_DIM, CY, seed=10)
    eye_x, eye_y = torch.eye(CX, dtype=F64), torch.eye(CY, dtype=F64)
    assert float(_trq_qk_from_moments(q_w, k_w, 2.0 * eye_x, 0.3 * eye_y)) == pytest.approx(1.0, rel=1e-12)
    sigma_x = torch.stack([_anisotropic_moment(CX, seed=11 + t) for t in range(4)])
    sigma_y = _anisotropic_moment(CY, seed=20)
    rho = _trq_qk_from_moments(q_w, k_w, sigma_x, sigma_y)  # per-timestep queries against constant text keys
    assert rho.shape == (4,)
    torch.testing.assert_close(_trq_qk_from_moments(3 * q_w, 0.5 * k_w, 7 * sigma_x, 0.1 * sigma_y), rho)
    for t in range(4):
        assert float(rho[t]) == pytest.approx(float(_trq_qk_from_moments(q_w, k_w, sigma_x[t], sigma_y)), rel=1e-12)


def test_trq_vo_is_the_head_average_of_trq_of_each_output_slice():
    o_w = _randn(7, HEADS * HEAD_DIM, seed=21)
    grams = torch.stack([_anisotropic_moment(HEAD_DIM, seed=22 + j) for j in range(HEADS)])
    expected = sum(float(trq(o_w[:, j * HEAD_DIM:(j + 1) * HEAD_DIM], grams[j])) for j in range(HEADS)) / HEADS
    assert float(trq_vo(o_w, grams, HEADS)) == pytest.approx(expected, rel=1e-12)
    per_step = trq_vo(o_w, torch.stack([grams, 2 * grams.flip(0)]), HEADS)
    assert per_step.shape == (2,)
    assert float(trq_vo(o_w, torch.eye(HEAD_DIM, dtype=F64).expand(HEADS, -1, -1), HEADS)) == pytest.approx(1.0)


def test_timestep_weights_sum_to_one_and_follow_rho_gamma_and_prior():
    rho = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, 3.0]], dtype=F64)
    w = timestep_weights(rho)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, dtype=F64))
    torch.testing.assert_close(w[0], torch.tensor([1, 2, 4], dtype=F64) / 7)
    torch.testing.assert_close(timestep_weights(rho, gamma=0.0), torch.full((2, 3), 1 / 3, dtype=F64))
    prior = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    w = timestep_weights(rho, gamma=2.0, prior=prior)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, dtype=F64))
    torch.testing.assert_close(w[0], torch.tensor([3, 8, 16], dtype=F64) / 27)


def test_timestep_weights_reject_invalid_rho():
    with pytest.raises(ValueError):
        timestep_weights(torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(ValueError):
        timestep_weights(torch.tensor([0.0, 0.0], dtype=F64))


def test_module_scores_weighting_propagation_and_min_max_normalisation():
    rho = torch.tensor([[1.0, 3.0], [2.0, 2.0], [1.0, 1.0]], dtype=F64)
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]], dtype=F64)
    scores = module_scores(rho, weights)  # raw: 2, 2, 1
    torch.testing.assert_close(scores, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    propagation = torch.tensor([[2.0, 2.0], [4.0, 0.0], [1.0, 5.0]], dtype=F64)  # π̄ = 2, 1, 1
    torch.testing.assert_close(module_scores(rho, weights, propagation), torch.tensor([1.0, 1 / 3, 0.0], dtype=F64))
    torch.testing.assert_close(module_scores(rho, weights, propagation, beta=2.0),
                               torch.tensor([1.0, 1 / 7, 0.0], dtype=F64))
    torch.testing.assert_close(module_scores(rho, weights, propagation, beta=0.0), scores)
    assert bool((module_scores(torch.ones(4, 3, dtype=F64), torch.full((3,), 1 / 3, dtype=F64)) == 0).all())
