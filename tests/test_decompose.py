"""Stage D decompositions on small float64 problems whose statistics are exact sample moments.

Using the moment of a finite sample set makes every "measured" error an exact mean over the samples, so the
closed forms must agree to rounding, not to Monte-Carlo noise.
"""

import pytest
import torch
import torch.nn.functional as F

from slimdiff.decompose import (
    FFN_SELECTORS,
    cholesky,
    ffn_decompose,
    ffn_measured_error,
    qk_decompose,
    qk_measured_error,
    regularise,
    value_gram,
    vo_decompose,
    vo_measured_error,
)

F64 = torch.float64


def _rng(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------------------------------------
# Type I
# ----------------------------------------------------------------------------------------------------------

C, INNER, TOKENS = 6, 12, 300


def _ffn(seed=0, gated=True):
    gen = _rng(seed)
    halves = 2 if gated else 1
    proj_w, proj_b = _randn(halves * INNER, C, gen=gen), _randn(halves * INNER, gen=gen)
    down_w, down_b = _randn(C, INNER, gen=gen), _randn(C, gen=gen)
    x = _randn(TOKENS, C, gen=gen)
    return proj_w, proj_b, down_w, down_b, x


def _inner(proj_w, proj_b, x, gated=True):
    """The input h of ``ff.net.2``, exactly as diffusers' GEGLU (``u, g = proj(x).chunk(2)``) or GELU computes it."""
    hidden = x @ proj_w.T + proj_b
    if not gated:
        return F.gelu(hidden)
    content, gate = hidden.chunk(2, dim=-1)
    return content * F.gelu(gate)


def _moment(samples):
    return samples.T @ samples / samples.shape[0]


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("selector", FFN_SELECTORS)
def test_ffn_full_rank_reproduces_output(selector, gated):
    proj_w, proj_b, down_w, down_b, x = _ffn(gated=gated)
    h = _inner(proj_w, proj_b, x, gated)
    out = ffn_decompose(proj_w, proj_b, down_w, _moment(h), INNER, gated=gated, ridge=0.0, selector=selector)
    y = h @ down_w.T + down_b
    y_new = _inner(out.proj_weight, out.proj_bias, x, gated) @ out.down_weight.T + down_b
    torch.testing.assert_close(y_new, y, rtol=1e-9, atol=1e-9)
    assert out.error_curve.shape == (INNER + 1,)
    assert out.error <= 1e-9 * out.error_curve[0]


@pytest.mark.parametrize("correct_down", [True, False])
@pytest.mark.parametrize("selector", FFN_SELECTORS)
def test_ffn_error_equals_reconstruction_error_on_samples(selector, correct_down):
    proj_w, proj_b, down_w, _, x = _ffn(seed=1)
    h = _inner(proj_w, proj_b, x)
    for rank in (1, 4, 7, 11):
        out = ffn_decompose(
            proj_w, proj_b, down_w, _moment(h), rank, ridge=0.0, selector=selector, correct_down=correct_down
        )
        h_kept = _inner(out.proj_weight, out.proj_bias, x)
        torch.testing.assert_close(h_kept, h[:, out.keep])  # the shared selection commutes with the GELU gate
        measured = (h @ down_w.T - h_kept @ out.down_weight.T).square().sum(1).mean()
        assert _rel(out.error, float(measured)) < 1e-6
        total = float((h @ down_w.T).square().sum(1).mean())
        assert _rel(out.relative_error, out.error / total) < 1e-9


@pytest.mark.parametrize("correct_down", [True, False])
@pytest.mark.parametrize("selector", ["cholesky", "output", "leverage"])
def test_ffn_error_curve_matches_measured_error_at_every_width(selector, correct_down):
    proj_w, proj_b, down_w, _, x = _ffn(seed=2)
    moment = _moment(_inner(proj_w, proj_b, x))
    ridged = regularise(moment, 1e-3)
    curve = ffn_decompose(proj_w, proj_b, down_w, moment, 1, ridge=1e-3, selector=selector,
                          correct_down=correct_down).error_curve
    assert _rel(float(curve[0]), float(torch.trace(down_w @ ridged @ down_w.T))) < 1e-9
    for rank in range(1, INNER + 1):
        out = ffn_decompose(proj_w, proj_b, down_w, moment, rank, ridge=1e-3, selector=selector,
                            correct_down=correct_down)
        measured = ffn_measured_error(down_w, ridged, out.keep, out.down_weight)
        assert _rel(float(curve[rank]), measured) < 1e-6 or abs(measured) < 1e-12 * float(curve[0])
        assert out.error == float(curve[rank])


def _businger_golub_pivots(factor):
    """Reference column-pivoted QR (Businger–Golub) pivot order, by Gram–Schmidt on the residual columns."""
    residual = factor.clone()
    available = list(range(factor.shape[1]))
    order = []
    for _ in range(factor.shape[1]):
        norms = residual[:, available].norm(dim=0)
        pivot = available[int(torch.argmax(norms))]
        q = residual[:, pivot] / residual[:, pivot].norm()
        residual -= torch.outer(q, q @ residual)
        available.remove(pivot)
        order.append(pivot)
    return torch.tensor(order)


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_pivoted_cholesky_pivots_equal_cpqr_pivots(ridge):
    inner = 72  # more than one block of the blocked pivoting
    gen = _rng(3)
    samples = _randn(100, inner, gen=gen) * torch.linspace(0.2, 3.0, inner, dtype=F64)
    moment = _moment(samples)
    down = _randn(4, inner, gen=gen)
    proj = _randn(2 * inner, 4, gen=gen)
    out = ffn_decompose(proj, None, down, moment, 8, ridge=ridge)
    # Any factor FᵀF of the ridged moment gives the same pivots; stacking √δ·I realises the ridge.
    delta = ridge * float(torch.trace(moment)) / inner
    factor = torch.cat([samples / 100**0.5, delta**0.5 * torch.eye(inner, dtype=F64)])
    torch.testing.assert_close(out.pivot_order, _businger_golub_pivots(factor), rtol=0, atol=0)
    upper = cholesky(regularise(moment, ridge)).T
    torch.testing.assert_close(out.pivot_order, _businger_golub_pivots(upper), rtol=0, atol=0)


def _output_aware_reference(moment, down):
    """Greedy Nyström pivots with an explicit residual: each step removes the most output error."""
    residual = moment.clone()
    order = []
    for _ in range(moment.shape[0]):
        gain = (down @ residual).square().sum(0) / residual.diagonal()
        gain[order] = -torch.inf
        pivot = int(torch.argmax(gain))
        residual = residual - torch.outer(residual[:, pivot], residual[pivot]) / residual[pivot, pivot]
        order.append(pivot)
    return torch.tensor(order)


def test_output_aware_pivots_match_an_explicit_greedy_reference():
    inner = 72  # more than one block of the blocked pivoting
    gen = _rng(8)
    moment = _moment(_randn(150, inner, gen=gen) * torch.linspace(0.2, 3.0, inner, dtype=F64))
    down = _randn(5, inner, gen=gen)
    out = ffn_decompose(_randn(2 * inner, 5, gen=gen), None, down, moment, 8, ridge=1e-3, selector="output")
    reference = _output_aware_reference(regularise(moment, 1e-3), down)
    torch.testing.assert_close(out.pivot_order, reference, rtol=0, atol=0)


def test_output_aware_first_pivot_is_the_best_single_neuron():
    proj_w, proj_b, down_w, _, x = _ffn(seed=4)
    moment = _moment(_inner(proj_w, proj_b, x))
    out = ffn_decompose(proj_w, proj_b, down_w, moment, 1, ridge=0.0, selector="output")
    total = torch.trace(down_w @ moment @ down_w.T)
    single = total - (down_w @ moment).square().sum(0) / moment.diagonal()
    assert _rel(out.error, float(single.min())) < 1e-9
    assert int(out.keep[0]) == int(torch.argmin(single))
    cpqr = ffn_decompose(proj_w, proj_b, down_w, moment, 1, ridge=0.0, selector="cholesky")
    assert out.error <= cpqr.error * (1 + 1e-12)


def test_ffn_rankings_of_data_free_and_leverage_selectors():
    proj_w, proj_b, down_w, _, x = _ffn(seed=5)
    moment = _moment(_inner(proj_w, proj_b, x))
    magnitude = down_w.norm(dim=0) * (proj_w[:INNER].square().sum(1) + proj_w[INNER:].square().sum(1)).sqrt()
    out = ffn_decompose(proj_w, proj_b, down_w, moment, 3, selector="magnitude")
    assert out.keep.tolist() == sorted(torch.argsort(magnitude, descending=True)[:3].tolist())

    sigma = regularise(moment, 1e-4)
    lam = 1e-2 * float(torch.trace(sigma)) / INNER
    # (Σ+λI)⁻¹Σ and Σ(Σ+λI)⁻¹ have the same diagonal
    leverage = torch.linalg.solve(sigma + lam * torch.eye(INNER, dtype=F64), sigma).diagonal()
    out = ffn_decompose(proj_w, proj_b, down_w, moment, 3, selector="leverage")
    assert out.keep.tolist() == sorted(torch.argsort(leverage, descending=True)[:3].tolist())

    first = ffn_decompose(proj_w, proj_b, down_w, moment, 5, selector="random", generator=_rng(7))
    again = ffn_decompose(proj_w, proj_b, down_w, moment, 5, selector="random", generator=_rng(7))
    assert first.keep.tolist() == again.keep.tolist()


def test_corrected_down_projection_never_loses_to_plain_slicing():
    proj_w, proj_b, down_w, _, x = _ffn(seed=6)
    moment = _moment(_inner(proj_w, proj_b, x))
    for rank in (2, 6, 10):
        fitted = ffn_decompose(proj_w, proj_b, down_w, moment, rank)
        sliced = ffn_decompose(proj_w, proj_b, down_w, moment, rank, correct_down=False)
        assert fitted.keep.tolist() == sliced.keep.tolist()
        assert fitted.error < sliced.error
        torch.testing.assert_close(sliced.down_weight, down_w[:, sliced.keep])


def test_ffn_rejects_bad_arguments():
    proj_w, proj_b, down_w, _, x = _ffn()
    moment = _moment(_inner(proj_w, proj_b, x))
    for rank in (0, INNER + 1):
        with pytest.raises(ValueError, match="rank"):
            ffn_decompose(proj_w, proj_b, down_w, moment, rank)
    with pytest.raises(ValueError, match="rows"):
        ffn_decompose(proj_w[:INNER], None, down_w, moment, 4)
    with pytest.raises(ValueError, match="selector"):
        ffn_decompose(proj_w, proj_b, down_w, moment, 4, selector="qr")


def test_cholesky_jitter_rescues_semidefinite_and_rejects_indefinite():
    singular = torch.ones(3, 3, dtype=F64)
    factor = cholesky(singular)
    torch.testing.assert_close(factor @ factor.T, singular, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="positive definite"):
        cholesky(-torch.eye(3, dtype=F64))


# ----------------------------------------------------------------------------------------------------------
# Type II
# ----------------------------------------------------------------------------------------------------------

HEADS, HEAD_DIM, CX, CY = 2, 4, 8, 6


def _qk(seed=0):
    gen = _rng(seed)
    q_w, k_w = _randn(HEADS * HEAD_DIM, CX, gen=gen), _randn(HEADS * HEAD_DIM, CY, gen=gen)
    x = _randn(50, CX, gen=gen) * torch.linspace(0.3, 2.0, CX, dtype=F64)
    y = _randn(30, CY, gen=gen) + 0.5  # uncentred, as text tokens are
    return q_w, k_w, x, y


def _head_logits(q_w, k_w, x, y, heads=HEADS):
    """(H, Nx, Ny) unscaled logits xᵀ W_Q^jᵀ W_K^j y."""
    q = (x @ q_w.T).reshape(x.shape[0], heads, -1).transpose(0, 1)
    k = (y @ k_w.T).reshape(y.shape[0], heads, -1).transpose(0, 1)
    return q @ k.mT


@pytest.mark.parametrize("selector", ["whitened_svd", "cr", "weight_svd"])
def test_qk_full_rank_reproduces_logits(selector):
    q_w, k_w, x, y = _qk()
    out = qk_decompose(q_w, k_w, _moment(x), _moment(y), HEADS, HEAD_DIM, ridge=0.0, selector=selector)
    torch.testing.assert_close(_head_logits(out.q_weight, out.k_weight, x, y), _head_logits(q_w, k_w, x, y))


@pytest.mark.parametrize("selector", ["whitened_svd", "cr"])
def test_qk_error_equals_logit_mse_over_all_token_pairs(selector):
    q_w, k_w, x, y = _qk(seed=1)
    sigma_x, sigma_y = _moment(x), _moment(y)
    logits = _head_logits(q_w, k_w, x, y)
    for rank in range(1, HEAD_DIM + 1):
        out = qk_decompose(q_w, k_w, sigma_x, sigma_y, HEADS, rank, ridge=0.0, selector=selector)
        assert out.q_weight.shape == (HEADS * rank, CX) and out.k_weight.shape == (HEADS * rank, CY)
        measured = (logits - _head_logits(out.q_weight, out.k_weight, x, y)).square().mean((1, 2)).sum()
        assert _rel(out.error, float(measured)) < 1e-6 or out.error < 1e-12 * float(out.error_curve[0])
        assert _rel(qk_measured_error(q_w, k_w, out.q_weight, out.k_weight, sigma_x, sigma_y, HEADS),
                    float(measured)) < 1e-9 or float(measured) < 1e-12
        assert out.error == float(out.error_curve[rank])
        assert _rel(out.relative_error, float(measured / logits.square().mean((1, 2)).sum())) < 1e-6 or rank == HEAD_DIM


def test_qk_whitened_svd_is_optimal_against_cr_and_weight_svd():
    q_w, k_w, x, y = _qk(seed=2)
    sigma_x, sigma_y = _moment(x), _moment(y)
    for rank in range(1, HEAD_DIM):
        errors = {}
        for selector in ("whitened_svd", "cr", "weight_svd"):
            out = qk_decompose(q_w, k_w, sigma_x, sigma_y, HEADS, rank, ridge=0.0, selector=selector)
            errors[selector] = qk_measured_error(q_w, k_w, out.q_weight, out.k_weight, sigma_x, sigma_y, HEADS)
        assert errors["whitened_svd"] <= min(errors["cr"], errors["weight_svd"]) * (1 + 1e-9)


def test_qk_weight_svd_is_the_truncated_svd_of_each_head_product():
    q_w, k_w, _, _ = _qk(seed=3)
    rank = 2
    out = qk_decompose(q_w, k_w, None, None, HEADS, rank, ridge=0.0, selector="weight_svd")
    tail = 0.0
    for j in range(HEADS):
        product = q_w[j * HEAD_DIM:(j + 1) * HEAD_DIM].T @ k_w[j * HEAD_DIM:(j + 1) * HEAD_DIM]
        u, s, vh = torch.linalg.svd(product)
        best = u[:, :rank] * s[:rank] @ vh[:rank]
        approx = out.q_weight[j * rank:(j + 1) * rank].T @ out.k_weight[j * rank:(j + 1) * rank]
        torch.testing.assert_close(approx, best)
        torch.testing.assert_close(out.singular_values[j], s[:HEAD_DIM])
        tail += float(s[rank:].square().sum())
    assert _rel(out.error, tail) < 1e-9


def _biased_attention_weights(q_w, q_b, k_w, k_b, x, y, heads=HEADS):
    """(H, Nx, Ny) softmax attention weights of projections with biases (unscaled logits)."""
    q = (x @ q_w.T + q_b).reshape(x.shape[0], heads, -1).transpose(0, 1)
    k = (y @ k_w.T + k_b).reshape(y.shape[0], heads, -1).transpose(0, 1)
    return torch.softmax(q @ k.mT, dim=-1)


@pytest.mark.parametrize("selector", ["whitened_svd", "cr"])
def test_qk_with_biases_keeps_the_attention_weights_and_its_error_is_that_of_the_key_dependent_logits(selector):
    q_w, k_w, x, y = _qk(seed=4)
    gen = _rng(5)
    q_b, k_b = _randn(HEADS * HEAD_DIM, gen=gen), _randn(HEADS * HEAD_DIM, gen=gen)
    x = x + 0.7  # uncentred query inputs: the query bias's logit term b_Qᵀ W_K y needs E[x] to be placed
    full = qk_decompose(q_w, k_w, _moment(x), _moment(y), HEADS, HEAD_DIM, ridge=0.0, selector=selector,
                        q_bias=q_b, k_bias=k_b, mean_x=x.mean(0))
    assert torch.equal(full.k_bias, torch.zeros(HEADS * HEAD_DIM, dtype=F64))  # the softmax cancels q·b_K
    torch.testing.assert_close(_biased_attention_weights(full.q_weight, full.q_bias, full.k_weight, full.k_bias, x, y),
                               _biased_attention_weights(q_w, q_b, k_w, k_b, x, y))
    # Lower ranks: the closed-form error is the MSE of the logits' key-dependent part, (W_Q x + b_Q)ᵀ W_K y.
    dense = _head_logits(torch.cat([q_w, q_b[:, None]], 1), k_w, torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1), y)
    for rank in range(1, HEAD_DIM):
        out = qk_decompose(q_w, k_w, _moment(x), _moment(y), HEADS, rank, ridge=0.0, selector=selector,
                           q_bias=q_b, k_bias=k_b, mean_x=x.mean(0))
        assert out.q_bias.shape == out.k_bias.shape == (HEADS * rank,) and out.q_weight.shape == (HEADS * rank, CX)
        approx = _head_logits(torch.cat([out.q_weight, out.q_bias[:, None]], 1), out.k_weight,
                              torch.cat([x, torch.ones(len(x), 1, dtype=F64)], 1), y)
        measured = (dense - approx).square().mean((1, 2)).sum()
        assert _rel(out.error, float(measured)) < 1e-6


def test_qk_rejects_bad_ranks_and_a_query_bias_without_the_input_mean():
    q_w, k_w, x, y = _qk()
    with pytest.raises(ValueError, match="mean"):
        qk_decompose(q_w, k_w, _moment(x), _moment(y), HEADS, 2, q_bias=torch.zeros(HEADS * HEAD_DIM, dtype=F64))
    with pytest.raises(ValueError, match="rank"):
        qk_decompose(q_w, k_w, _moment(x), _moment(y), HEADS, HEAD_DIM + 1)
    with pytest.raises(ValueError, match="moments"):
        qk_decompose(q_w, k_w, None, _moment(y), HEADS, 2)


# ----------------------------------------------------------------------------------------------------------
# Type III
# ----------------------------------------------------------------------------------------------------------

C_OUT, VALUE_TOKENS = 8, 40


def _vo(seed=0):
    gen = _rng(seed)
    v_w, o_w = _randn(HEADS * HEAD_DIM, CY, gen=gen), _randn(C_OUT, HEADS * HEAD_DIM, gen=gen)
    o_b = _randn(C_OUT, gen=gen)
    y = _randn(VALUE_TOKENS, CY, gen=gen) + 0.3
    attention = torch.softmax(2.0 * _randn(HEADS, VALUE_TOKENS, VALUE_TOKENS, gen=gen), dim=-1)
    mixed = attention @ y  # (H, N, C_y): ȳ^j, the attention-weighted value inputs of head j
    return v_w, o_w, o_b, mixed


def _attention_output(v_w, mixed):
    """(H, N, d) per-head attention outputs z^j = A_j Y W_V^jᵀ."""
    return mixed @ v_w.reshape(HEADS, -1, CY).mT


def _to_out(o_w, z, o_b):
    return torch.cat(list(z), dim=-1) @ o_w.T + o_b


def _z_gram(z):
    return z.mT @ z / z.shape[1]


def test_vo_full_rank_reproduces_output():
    v_w, o_w, o_b, mixed = _vo()
    z = _attention_output(v_w, mixed)
    out = vo_decompose(v_w, o_w, _z_gram(z), HEADS, HEAD_DIM, ridge=0.0)
    z_new = _attention_output(out.v_weight, mixed)
    torch.testing.assert_close(_to_out(out.o_weight, z_new, o_b), _to_out(o_w, z, o_b))


def test_vo_error_equals_per_head_output_error_on_samples():
    v_w, o_w, o_b, mixed = _vo(seed=1)
    z = _attention_output(v_w, mixed)
    heads_o = o_w.reshape(C_OUT, HEADS, HEAD_DIM).transpose(0, 1)
    for rank in range(1, HEAD_DIM + 1):
        out = vo_decompose(v_w, o_w, _z_gram(z), HEADS, rank, ridge=0.0)
        z_new = mixed @ out.v_weight.reshape(HEADS, rank, CY).mT
        new_o = out.o_weight.reshape(C_OUT, HEADS, rank).transpose(0, 1)
        measured = (z @ heads_o.mT - z_new @ new_o.mT).square().sum(-1).mean(-1).sum()
        assert _rel(out.error, float(measured)) < 1e-6 or out.error < 1e-12 * float(out.error_curve[0])
        on_moment = vo_measured_error(v_w, o_w, out.v_weight, out.o_weight, _z_gram(mixed), HEADS)
        assert _rel(on_moment, float(measured)) < 1e-9 or float(measured) < 1e-12
        assert out.error == float(out.error_curve[rank])
        # with full rank, the module output is reproduced per token, bias included
        if rank == HEAD_DIM:
            torch.testing.assert_close(_to_out(out.o_weight, z_new, o_b), _to_out(o_w, z, o_b))


def test_vo_value_gram_without_data_is_the_truncated_svd_of_each_head_product():
    v_w, o_w, _, _ = _vo(seed=2)
    rank = 2
    out = vo_decompose(v_w, o_w, value_gram(v_w, None, HEADS), HEADS, rank, ridge=0.0)
    for j in range(HEADS):
        product = o_w[:, j * HEAD_DIM:(j + 1) * HEAD_DIM] @ v_w[j * HEAD_DIM:(j + 1) * HEAD_DIM]
        u, s, vh = torch.linalg.svd(product)
        approx = out.o_weight[:, j * rank:(j + 1) * rank] @ out.v_weight[j * rank:(j + 1) * rank]
        torch.testing.assert_close(approx, u[:, :rank] * s[:rank] @ vh[:rank])


def test_vo_value_gram_matches_its_definition_and_identity_gram_is_svd_of_output_weight():
    v_w, o_w, _, mixed = _vo(seed=3)
    sigma_y = _moment(mixed[0])
    gram = value_gram(v_w, sigma_y, HEADS)
    for j in range(HEADS):
        head = v_w[j * HEAD_DIM:(j + 1) * HEAD_DIM]
        torch.testing.assert_close(gram[j], head @ sigma_y @ head.T)
    out = vo_decompose(v_w, o_w, None, HEADS, 2, ridge=0.0)
    s = torch.linalg.svdvals(o_w.reshape(C_OUT, HEADS, HEAD_DIM).transpose(0, 1))
    torch.testing.assert_close(out.singular_values, s)


def test_vo_folds_a_value_bias_into_the_output_bias():
    v_w, o_w, o_b, mixed = _vo(seed=4)
    v_b = _randn(HEADS * HEAD_DIM, gen=_rng(6))
    z_less_bias = _attention_output(v_w, mixed)  # the mixing weights sum to one: z = A(YW_Vᵀ + b_V) = AYW_Vᵀ + b_V
    dense = _to_out(o_w, z_less_bias + v_b.reshape(HEADS, 1, HEAD_DIM), o_b)
    for rank in (HEAD_DIM, 2):
        out = vo_decompose(v_w, o_w, _z_gram(z_less_bias), HEADS, rank, ridge=0.0, v_bias=v_b, o_bias=o_b)
        assert torch.equal(out.v_bias, torch.zeros(HEADS * rank, dtype=F64))
        z_new = mixed @ out.v_weight.reshape(HEADS, rank, CY).mT
        slim = _to_out(out.o_weight, z_new, out.o_bias)
        if rank == HEAD_DIM:
            torch.testing.assert_close(slim, dense)
        else:  # the closed-form error is the per-head output error of the bias-free part
            heads_o = o_w.reshape(C_OUT, HEADS, HEAD_DIM).transpose(0, 1)
            new_o = out.o_weight.reshape(C_OUT, HEADS, rank).transpose(0, 1)
            measured = (z_less_bias @ heads_o.mT - z_new @ new_o.mT).square().sum(-1).mean(-1).sum()
            assert _rel(out.error, float(measured)) < 1e-6


def test_vo_rejects_bad_shapes_and_a_value_bias_with_no_output_bias():
    v_w, o_w, _, mixed = _vo()
    gram = _z_gram(_attention_output(v_w, mixed))
    with pytest.raises(ValueError, match="bias"):
        vo_decompose(v_w, o_w, gram, HEADS, 2, v_bias=torch.zeros(HEADS * HEAD_DIM, dtype=F64))
    with pytest.raises(ValueError, match="gram"):
        vo_decompose(v_w, o_w, gram[0], HEADS, 2)
    with pytest.raises(ValueError, match="rank"):
        vo_decompose(v_w, o_w, gram, HEADS, 0)
