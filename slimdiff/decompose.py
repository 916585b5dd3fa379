"""Stage D — module-aligned decompositions (method.md §6), as pure functions on tensors.

* Type I, feed-forward (GEGLU or plain GELU): Nyström column selection of the inner width, shared by the content
  and gate halves, plus a least-squares corrected down-projection (§6.1).
* Type II, query–key: per-head two-sided whitening SVD of the bilinear form ``W_Q^jᵀ W_K^j`` (§6.2).
* Type III, value–output: per-head whitening SVD of ``W_O^j`` against the attention-output Gram (§6.3).

Conventions. Weights use the torch ``nn.Linear`` layout (out, in). All linear algebra runs in float64 on the
device of the statistic; returned weights come back in the dtype and device of the weights passed in, errors
are Python floats and error curves are float64 CPU tensors. Every ``error_curve`` is indexed by the retained
width: ``curve[k]`` is the closed-form error when keeping ``k`` units (``curve[0]`` is the module's whole output
energy, ``curve[-1]`` is 0), which is what the allocator (Stage E) consumes. Errors are computed on the *ridged*
statistics the decomposition actually used; the ``*_measured_error`` functions evaluate any pair of weights on
whatever statistic they are given, so tests and logs can check the closed forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

FFN_SELECTORS = ("cholesky", "leverage", "output", "magnitude", "random")
QK_SELECTORS = ("whitened_svd", "cr", "weight_svd")

_JITTER_START = 1e-10  # relative to the mean eigenvalue, escalated ×10 per failed attempt
_JITTER_ATTEMPTS = 5
_PIVOT_BLOCK = 64  # pivots per rank-`block` trailing update: GEMM-sized work instead of one GEMV per pivot


# ----------------------------------------------------------------------------------------------------------
# Shared numerics
# ----------------------------------------------------------------------------------------------------------


def regularise(gram: Tensor, ridge: float) -> Tensor:
    """Symmetrised, relatively ridged float64 copy of a Gram matrix: ``(G+Gᵀ)/2 + ridge·tr(G)/dim·I``.

    ``gram``: (..., d, d); the ridge is relative to each matrix's own mean eigenvalue, so it is scale-free.
    """
    gram = gram.to(torch.float64)
    sym = 0.5 * (gram + gram.mT)
    dim = sym.shape[-1]
    mean_eig = sym.diagonal(dim1=-2, dim2=-1).sum(-1) / dim
    eye = torch.eye(dim, dtype=sym.dtype, device=sym.device)
    return sym + (ridge * mean_eig)[..., None, None] * eye


def cholesky(gram: Tensor) -> Tensor:
    """Lower Cholesky factor of a (batch of) symmetric positive (semi-)definite matrices, shape (..., d, d).

    Matrices that fail get a diagonal jitter of 1e-10·mean-eigenvalue, escalated ×10 up to five times; the
    factor then belongs to the jittered matrix (a perturbation far below any ridge this module uses).
    """
    factor, info = torch.linalg.cholesky_ex(gram)
    if not bool((info > 0).any()):
        return factor
    dim = gram.shape[-1]
    mean_eig = (gram.diagonal(dim1=-2, dim2=-1).sum(-1) / dim).abs().clamp_min(torch.finfo(gram.dtype).tiny)
    eye = torch.eye(dim, dtype=gram.dtype, device=gram.device)
    jitter = _JITTER_START
    for _ in range(_JITTER_ATTEMPTS):
        failed = (info > 0)[..., None, None]
        retry, retry_info = torch.linalg.cholesky_ex(gram + (jitter * mean_eig)[..., None, None] * eye)
        factor = torch.where(failed, retry, factor)
        info = torch.where(info > 0, retry_info, info)
        if not bool((info > 0).any()):
            return factor
        jitter *= 10.0
    raise ValueError(
        f"matrix is not positive definite even with a relative jitter of {jitter / 10:.0e}; "
        "the statistic is degenerate (raise the ridge)"
    )


def _tail_sums(energies: Tensor) -> Tensor:
    """``out[k] = Σ_{i≥k} energies[i]`` for k = 0..n (length n+1, last entry 0).

    Summing the tail instead of subtracting a prefix from the total keeps small errors accurate.
    """
    tail = energies.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([tail, tail.new_zeros(*tail.shape[:-1], 1)], dim=-1)


def _trailing_block_sums(matrix: Tensor) -> Tensor:
    """``out[k] = Σ_{i,j≥k} matrix[i, j]`` for k = 0..n; ``matrix`` (..., n, n) → (..., n+1)."""
    tails = matrix.flip(-2, -1).cumsum(-1).cumsum(-2).flip(-2, -1)
    diag = tails.diagonal(dim1=-2, dim2=-1)
    return torch.cat([diag, diag.new_zeros(*diag.shape[:-1], 1)], dim=-1)


def _check_rank(rank: int, width: int, what: str) -> None:
    if not 1 <= rank <= width:
        raise ValueError(f"{what} rank must lie in [1, {width}], got {rank}")


def with_bias_coordinate(weight: Tensor, bias: Tensor, moment: Tensor | None,
                         mean: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A Linear with a bias as one without, on inputs with a constant-1 coordinate appended (method.md §6.2):
    [W | b] (out, C+1) and the second moment of [x; 1] from E[xxᵀ] and E[x], ((C+1)×(C+1); None stays None)."""
    augmented = torch.cat([weight, bias.to(weight)[:, None]], 1)
    if moment is None:
        return augmented, None
    if mean is None:
        raise ValueError("a projection with a bias needs the mean of its inputs beside their second moment")
    mean = mean.to(moment)
    top = torch.cat([moment, mean[:, None]], 1)
    return augmented, torch.cat([top, torch.cat([mean, mean.new_ones(1)])[None]], 0)


def _split_heads(weight: Tensor, heads: int, name: str) -> Tensor:
    """(H·d_h, C) rows → (H, d_h, C)."""
    rows = weight.shape[0]
    if rows % heads:
        raise ValueError(f"{name} has {rows} rows, not divisible by {heads} heads")
    return weight.reshape(heads, rows // heads, weight.shape[1])


def _head_grams(weight_heads: Tensor, moment: Tensor | None) -> Tensor:
    """``W^j Σ W^jᵀ`` for every head: (H, d_h, C) with (C, C) → (H, d_h, d_h); ``None`` means Σ = I."""
    if moment is None:
        return weight_heads @ weight_heads.mT
    return weight_heads @ moment @ weight_heads.mT


# ----------------------------------------------------------------------------------------------------------
# Type I — feed-forward
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FFNDecomposition:
    """A slimmed feed-forward block of inner width k (out of I).

    keep: (k,) kept inner indices, sorted ascending; the new weights follow this order.
    pivot_order: (I,) the selector's full ranking; ``keep == sort(pivot_order[:k])``.
    proj_weight: (2k, C) content rows then gate rows ((k, C) for a plain GELU FFN).
    proj_bias: (2k,) / (k,), or None when the original had none.
    down_weight: (C_out, k), least-squares corrected (or plainly sliced when ``correct_down=False``).
    error: E‖W_D h − B h_J‖² on the ridged moment; relative_error: error / E‖W_D h‖².
    error_curve: (I+1,) the same error for every k along ``pivot_order``, with the same correction setting.
    down_map: (I, k) the map of the down projection's input columns, ``down_weight = W_D · down_map``
        (``Σ[:, J] Σ[J, J]⁻¹``, or the selection of J without the correction); computed on request only, for LoRAs
        mapped onto the slim model (it is as large as the down projection).
    """

    keep: Tensor
    pivot_order: Tensor
    proj_weight: Tensor
    proj_bias: Tensor | None
    down_weight: Tensor
    error: float
    relative_error: float
    error_curve: Tensor
    down_map: Tensor | None = None


def ffn_decompose(
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    down_weight: Tensor,
    moment: Tensor,
    rank: int,
    *,
    gated: bool = True,
    ridge: float = 1e-4,
    selector: str = "cholesky",
    correct_down: bool = True,
    leverage_ridge: float = 1e-2,
    generator: torch.Generator | None = None,
    with_down_map: bool = False,
) -> FFNDecomposition:
    """Keep ``rank`` inner neurons of an FFN and re-fit its down projection (method.md §6.1).

    proj_weight: ``ff.net.0.proj.weight``, (2I, C) for GEGLU (rows [0, I) content, [I, 2I) gate, which share one
        selection because GELU acts elementwise), or (I, C) with ``gated=False``.
    proj_bias: (2I,) / (I,) or None.  down_weight: ``ff.net.2.weight``, (C_out, I); its bias is unchanged.
    moment: (I, I) uncentred second moment of the down projection's input h.
    selector: how the inner neurons are ranked —
        "cholesky"  greedy diagonal-pivoted Cholesky of the ridged moment (= column-pivoted QR of any factor);
        "leverage"  MoDeGPT's ridge leverage scores [Σ(Σ+λI)⁻¹]_ii, λ = leverage_ridge·tr(Σ)/I;
        "output"    greedy pivoting that maximises the decrease of the output error E_I at every step;
        "magnitude" ‖W_D[:, i]‖·(‖W_a[i]‖² + ‖W_g[i]‖²)^½, data-free baseline (the moment still fits B);
        "random"    a permutation drawn from ``generator`` (seed 0 when None).
    correct_down: False keeps ``W_D[:, J]`` as it is (baseline separating selection from correction).
    with_down_map: also return ``down_map`` (see :class:`FFNDecomposition`).
    """
    if selector not in FFN_SELECTORS:
        raise ValueError(f"unknown FFN selector {selector!r}; choose one of {FFN_SELECTORS}")
    inner = moment.shape[-1]
    if moment.shape != (inner, inner):
        raise ValueError(f"FFN moment must be square, got shape {tuple(moment.shape)}")
    if down_weight.shape[1] != inner:
        raise ValueError(f"down weight {tuple(down_weight.shape)} does not match an inner width of {inner}")
    halves = 2 if gated else 1
    if proj_weight.shape[0] != halves * inner:
        raise ValueError(
            f"projection weight has {proj_weight.shape[0]} rows, expected {halves}·{inner} "
            f"({'GEGLU content+gate' if gated else 'plain GELU'})"
        )
    if proj_bias is not None and proj_bias.shape != (halves * inner,):
        raise ValueError(f"projection bias shape {tuple(proj_bias.shape)} does not match the weight")
    _check_rank(rank, inner, "FFN")

    device = moment.device
    sigma = regularise(moment, ridge)
    down = down_weight.to(device=device, dtype=torch.float64)
    proj = proj_weight.to(device=device, dtype=torch.float64)

    if selector == "cholesky":
        order = _greedy_pivot_order(sigma)
    elif selector == "output":
        order = _greedy_pivot_order(sigma, down)
    elif selector == "leverage":
        order = _leverage_order(sigma, leverage_ridge)
    elif selector == "magnitude":
        in_norm2 = proj.reshape(halves, inner, -1).square().sum(dim=(0, 2))
        order = torch.argsort(down.norm(dim=0) * in_norm2.sqrt(), descending=True, stable=True)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        order = torch.randperm(inner, generator=generator).to(device)

    curve = _ffn_error_curve(sigma, down, order, correct_down)
    keep = torch.sort(order[:rank]).values
    down_map = None
    if correct_down:
        # B = W_D Σ[:, J] Σ[J, J]⁻¹, i.e. solve Σ[J, J] Bᵀ = Σ[J, :] W_Dᵀ with the Cholesky factor of Σ[J, J].
        factor = cholesky(sigma[keep][:, keep])
        new_down = torch.cholesky_solve(sigma[keep] @ down.T, factor).T
        if with_down_map:
            down_map = torch.cholesky_solve(sigma[keep], factor).T
    else:
        new_down = down[:, keep]
        if with_down_map:
            down_map = torch.eye(inner, dtype=torch.float64, device=device)[:, keep]
    rows = torch.cat([keep + half * inner for half in range(halves)])
    new_bias = None if proj_bias is None else proj_bias[rows.to(proj_bias.device)]

    error, total = float(curve[rank]), float(curve[0])
    return FFNDecomposition(
        keep=keep.cpu(),
        pivot_order=order.cpu(),
        proj_weight=proj_weight[rows.to(proj_weight.device)],
        proj_bias=new_bias,
        down_weight=new_down.to(dtype=down_weight.dtype, device=down_weight.device),
        error=error,
        relative_error=error / total if total > 0 else 0.0,
        error_curve=curve.cpu(),
        down_map=None if down_map is None else down_map.cpu(),
    )


def _greedy_pivot_order(sigma: Tensor, down: Tensor | None = None) -> Tensor:
    """Full pivot order of greedy pivoted Cholesky of ``sigma`` (n, n) → (n,) LongTensor.

    Without ``down`` the pivot is the largest residual diagonal (LAPACK ``?pstrf``, identical to Businger–Golub
    column-pivoted QR on any factor F with FᵀF = Σ). With ``down`` (C, n) it is the column whose Nyström step
    removes the most output error, ‖W_D R[:, i]‖² / R_ii for the current residual R.

    Blocked right-looking scheme: within a block, a pivot's residual column is the stored trailing matrix minus
    the block's earlier columns, and the trailing matrix (and W_D R) are updated once per block by a GEMM. The
    output-aware column energies ‖W_D R[:, i]‖² are updated in place per pivot and recomputed at every block.
    """
    n = sigma.shape[0]
    residual = sigma.clone()
    diag = sigma.diagonal().clone()
    available = torch.ones(n, dtype=torch.bool, device=sigma.device)
    exhausted = n * torch.finfo(torch.float64).eps * float(diag.abs().max())
    projected = None if down is None else down @ sigma  # W_D R at the start of the current block
    order = torch.empty(n, dtype=torch.long, device=sigma.device)
    step = 0
    while step < n:
        panel = sigma.new_zeros(n, min(_PIVOT_BLOCK, n - step))
        if projected is not None:
            panel_out = sigma.new_zeros(down.shape[0], panel.shape[1])  # W_D times the panel's columns
            energy = projected.square().sum(0)
        for j in range(panel.shape[1]):
            if projected is None:
                gain = diag.clone()
            else:
                gain = torch.where(diag > exhausted, energy / diag.clamp_min(exhausted), 0.0)
            gain[~available] = -math.inf
            pivot = int(torch.argmax(gain))
            column = residual[:, pivot] - panel[:, :j] @ panel[pivot, :j]
            if float(column[pivot]) <= exhausted:
                # Numerically rank-exhausted: every later choice removes nothing, so keep index order.
                order[step:] = torch.nonzero(available).flatten()
                return order
            column = column / column[pivot].sqrt()
            panel[:, j] = column
            diag -= column.square()
            available[pivot] = False
            order[step] = pivot
            step += 1
            if projected is not None:
                # ‖p_i − a l_i‖² with a = W_D l and p_i the current columns of W_D R = projected − panel_out panelᵀ
                out = down @ column
                cross = out @ projected - (out @ panel_out[:, :j]) @ panel[:, :j].T
                energy += column * (column * out.square().sum() - 2.0 * cross)
                panel_out[:, j] = out
        residual -= panel @ panel.T
        if projected is not None:
            projected -= panel_out @ panel.T
    return order


def _leverage_order(sigma: Tensor, leverage_ridge: float) -> Tensor:
    """Neurons by descending ridge leverage ℓ_i = [Σ(Σ+λI)⁻¹]_ii = 1 − λ[(Σ+λI)⁻¹]_ii."""
    lam = leverage_ridge * float(sigma.diagonal().mean())
    inverse = torch.cholesky_inverse(cholesky(regularise(sigma, leverage_ridge)))
    leverage = 1.0 - lam * inverse.diagonal()
    return torch.argsort(leverage, descending=True, stable=True)


def _ffn_error_curve(sigma: Tensor, down: Tensor, order: Tensor, correct_down: bool) -> Tensor:
    """E_I(k) for k = 0..n keeping ``order[:k]``: (n+1,) float64.

    Corrected: the Nyström residual after k ordered pivots is Σ − L_k L_kᵀ (L_k the first k columns of the
    Cholesky factor of the permuted Σ), so E(k) = Σ_{i≥k} ‖W_D l_i‖².
    Uncorrected: the error is the energy of the dropped columns, tr(W_D[:, Jᶜ] Σ[Jᶜ, Jᶜ] W_D[:, Jᶜ]ᵀ).
    """
    permuted = sigma[order][:, order]
    ordered_down = down[:, order]
    if correct_down:
        return _tail_sums((ordered_down @ cholesky(permuted)).square().sum(0))
    return _trailing_block_sums((ordered_down.T @ ordered_down) * permuted)


def ffn_measured_error(down_weight: Tensor, moment: Tensor, keep: Tensor, new_down_weight: Tensor) -> float:
    """E‖W_D h − B h_J‖² evaluated directly on a moment of h.

    down_weight (C_out, I); moment (I, I); keep (k,) indices J; new_down_weight (C_out, k) = B.
    """
    moment = moment.to(torch.float64)
    diff = down_weight.to(device=moment.device, dtype=torch.float64).clone()
    diff[:, keep.to(moment.device)] -= new_down_weight.to(device=moment.device, dtype=torch.float64)
    return float(torch.einsum("ci,ij,cj->", diff, moment, diff))


# ----------------------------------------------------------------------------------------------------------
# Type II — query–key
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QKDecomposition:
    """Query/key projections with per-head width r (out of d_h), all H heads kept.

    q_weight: (H·r, C_x); k_weight: (H·r, C_y); head j occupies rows [j·r, (j+1)·r). Logits must keep the
        original softmax scale 1/√d_h.
    singular_values: (H, d_h) whitened singular values per head, descending (None for the "cr" selector).
    error: Σ_j E(xᵀ(M_j − M̂_j)y)² on the ridged head Grams (unscaled logits, heads summed);
        relative_error: error / Σ_j E(xᵀM_j y)².
    error_curve: (d_h+1,) the same error at every per-head rank, summed over heads.
    """

    q_weight: Tensor
    k_weight: Tensor
    singular_values: Tensor | None
    error: float
    relative_error: float
    error_curve: Tensor
    q_bias: Tensor | None = None  # (H·r,) when the original query projection had a bias
    k_bias: Tensor | None = None  # zeros (H·r,) when the original key projection had a bias
    # (H, r, d_h): each head's new rows are these combinations of its original rows, Ŵ^j = T^j W^j (a LoRA on the
    # dense projection maps onto the slim one the same way)
    q_map: Tensor | None = None
    k_map: Tensor | None = None


def qk_decompose(
    q_weight: Tensor,
    k_weight: Tensor,
    sigma_x: Tensor | None,
    sigma_y: Tensor | None,
    heads: int,
    rank: int,
    *,
    ridge: float = 1e-6,
    selector: str = "whitened_svd",
    q_bias: Tensor | None = None,
    k_bias: Tensor | None = None,
    mean_x: Tensor | None = None,
) -> QKDecomposition:
    """Per-head rank-``rank`` approximation of the logit form ``x ᵀ W_Q^jᵀ W_K^j y`` (method.md §6.2).

    q_weight (H·d_h, C_x), k_weight (H·d_h, C_y); sigma_x (C_x, C_x), sigma_y (C_y, C_y) the second moments of
    the query-side and key-side inputs. Head Grams G = W^j Σ W^jᵀ get a ridge·tr(G)/d_h ridge.
    selector:
        "whitened_svd" two-sided whitening SVD, optimal for the (ridged) logit MSE: with G_q = L_qL_qᵀ,
                       G_k = L_kL_kᵀ and L_qᵀL_k = U diag(σ) Vᵀ, new rows diag(σ_r)^½U_rᵀL_q⁻¹W_Q^j and
                       diag(σ_r)^½V_rᵀL_k⁻¹W_K^j (the √σ split balances magnitudes for fp16);
        "cr"           MoDeGPT's CR selection: keep the r head coordinates with the largest
                       ‖G_q^½[:, i]‖·‖G_k^½[:, i]‖ = (G_q,ii·G_k,ii)^½ and slice the rows unmixed;
        "weight_svd"   data-free baseline, the truncated SVD of M_j: the whitened SVD with Σ_x = Σ_y = I, which
                       is exact (up to the ridge) because W^j = L·Q with orthonormal Q. sigma_x/sigma_y are ignored.
    q_bias/k_bias: the modules' biases (SD's have none; PixArt's do). The key bias adds q·b_K to every logit of a
        query alike, which the softmax cancels: it is dropped exactly (``k_bias`` of the result is zeros). The query
        bias adds b_Qᵀ W_K y, which depends on the key: it is carried by a constant-1 input coordinate
        (:func:`with_bias_coordinate`), so ``mean_x`` = E[x] is needed beside ``sigma_x``; the new query bias is
        the last column of the new augmented rows.
    """
    if selector not in QK_SELECTORS:
        raise ValueError(f"unknown QK selector {selector!r}; choose one of {QK_SELECTORS}")
    if q_bias is not None:
        in_x = q_weight.shape[1]
        q_weight, sigma_x = with_bias_coordinate(q_weight, q_bias, None if selector == "weight_svd" else sigma_x,
                                                 mean_x)
        out = qk_decompose(q_weight, k_weight, sigma_x, sigma_y, heads, rank, ridge=ridge, selector=selector)
        return replace(out, q_weight=out.q_weight[:, :in_x].contiguous(), q_bias=out.q_weight[:, in_x].contiguous(),
                       k_bias=None if k_bias is None else out.k_weight.new_zeros(out.k_weight.shape[0]))
    if q_weight.shape[0] != k_weight.shape[0]:
        raise ValueError(f"query {tuple(q_weight.shape)} and key {tuple(k_weight.shape)} widths differ")
    if selector == "weight_svd":
        sigma_x = sigma_y = None
    elif sigma_x is None or sigma_y is None:
        raise ValueError(f"QK selector {selector!r} needs both input moments")
    else:
        for name, sigma, weight in (("sigma_x", sigma_x, q_weight), ("sigma_y", sigma_y, k_weight)):
            if sigma.shape != (weight.shape[1], weight.shape[1]):
                raise ValueError(f"{name} shape {tuple(sigma.shape)} does not match weight {tuple(weight.shape)}")

    device = sigma_x.device if sigma_x is not None else q_weight.device
    wq = _split_heads(q_weight.to(device=device, dtype=torch.float64), heads, "to_q")
    wk = _split_heads(k_weight.to(device=device, dtype=torch.float64), heads, "to_k")
    head_dim = wq.shape[1]
    _check_rank(rank, head_dim, "QK per-head")
    moment_x = None if sigma_x is None else sigma_x.to(device=device, dtype=torch.float64)
    moment_y = None if sigma_y is None else sigma_y.to(device=device, dtype=torch.float64)
    gram_q = regularise(_head_grams(wq, moment_x), ridge)
    gram_k = regularise(_head_grams(wk, moment_y), ridge)

    if selector == "cr":
        scores = (gram_q.diagonal(dim1=-2, dim2=-1) * gram_k.diagonal(dim1=-2, dim2=-1)).sqrt()
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # (H, d_h)
        keep = torch.sort(order[:, :rank], dim=-1).values
        to_q = to_k = torch.eye(head_dim, dtype=torch.float64, device=device)[keep]  # (H, r, d_h) selections
        new_q, new_k = to_q @ wq, to_k @ wk
        # Dropping coordinates Jᶜ leaves the logit error tr(G_q[Jᶜ,Jᶜ] G_k[Jᶜ,Jᶜ]) = Σ_{Jᶜ×Jᶜ} G_q ⊙ G_k.
        head = torch.arange(heads, device=device)[:, None, None]
        pair = (head, order[:, :, None], order[:, None, :])  # each head's Gram in its own ranking
        curve = _trailing_block_sums(gram_q[pair] * gram_k[pair]).sum(0)
        singular_values = None
    else:
        factor_q, factor_k = cholesky(gram_q), cholesky(gram_k)
        left, singular_values, right_h = torch.linalg.svd(factor_q.mT @ factor_k)
        root = singular_values[:, :rank].sqrt()[:, None, :]
        # T = diag(√σ_r) U_rᵀ L⁻¹, obtained as Tᵀ = L⁻ᵀ (U_r diag √σ_r) by one triangular solve.
        to_q = torch.linalg.solve_triangular(factor_q.mT, left[..., :rank] * root, upper=True).mT
        to_k = torch.linalg.solve_triangular(factor_k.mT, right_h[:, :rank].mT * root, upper=True).mT
        new_q, new_k = to_q @ wq, to_k @ wk
        curve = _tail_sums(singular_values.square().sum(0))

    error, total = float(curve[rank]), float(curve[0])
    return QKDecomposition(
        q_weight=new_q.reshape(heads * rank, -1).to(dtype=q_weight.dtype, device=q_weight.device),
        k_weight=new_k.reshape(heads * rank, -1).to(dtype=k_weight.dtype, device=k_weight.device),
        singular_values=None if singular_values is None else singular_values.cpu(),
        error=error,
        relative_error=error / total if total > 0 else 0.0,
        error_curve=curve.cpu(),
        k_bias=None if k_bias is None else k_weight.new_zeros(heads * rank),
        q_map=to_q.cpu(),
        k_map=to_k.cpu(),
    )


def qk_measured_error(
    q_weight: Tensor,
    k_weight: Tensor,
    new_q_weight: Tensor,
    new_k_weight: Tensor,
    sigma_x: Tensor,
    sigma_y: Tensor,
    heads: int,
) -> float:
    """Σ_j E(xᵀ(M_j − M̂_j)y)² = Σ_j tr(Σ_x D_j Σ_y D_jᵀ), D_j = W_Q^jᵀW_K^j − Ŵ_Q^jᵀŴ_K^j (x, y independent).

    Original weights (H·d_h, C_x/C_y), new weights (H·r, C_x/C_y), moments (C_x, C_x) and (C_y, C_y).
    """
    device = sigma_x.device
    as64 = lambda t: t.to(device=device, dtype=torch.float64)  # noqa: E731
    wq, wk = _split_heads(as64(q_weight), heads, "to_q"), _split_heads(as64(k_weight), heads, "to_k")
    nq, nk = _split_heads(as64(new_q_weight), heads, "new to_q"), _split_heads(as64(new_k_weight), heads, "new to_k")
    diff = wq.mT @ wk - nq.mT @ nk  # (H, C_x, C_y)
    return float(torch.einsum("ab,hbc,cd,had->", as64(sigma_x), diff, as64(sigma_y), diff))


# ----------------------------------------------------------------------------------------------------------
# Type III — value–output
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VODecomposition:
    """Value/output projections with per-head width r (out of d_h), all H heads kept.

    v_weight: (H·r, C_y), head j in rows [j·r, (j+1)·r); o_weight: (C_out, H·r), head j in columns
        [j·r, (j+1)·r); ``to_out.0``'s bias is unchanged unless a value bias was folded into it (``o_bias``).
    singular_values: (H, d_h) singular values of W_O^j L_z per head, descending.
    error: Σ_j E‖W_O^j z^j − Ŵ_O^j ẑ^j‖² on the ridged Gram (per query token, cross-head terms ignored as in
        MoDeGPT); relative_error: error / Σ_j E‖W_O^j z^j‖².
    error_curve: (d_h+1,) the same error at every per-head rank, summed over heads.
    """

    v_weight: Tensor
    o_weight: Tensor
    singular_values: Tensor
    error: float
    relative_error: float
    error_curve: Tensor
    v_bias: Tensor | None = None  # zeros (H·r,) when the original value projection had a bias
    o_bias: Tensor | None = None  # the output bias with the value bias folded in (when ``to_v`` had one)
    v_map: Tensor | None = None  # (H, r, d_h): Ŵ_V^j = T^j W_V^j
    o_map: Tensor | None = None  # (H, d_h, r): Ŵ_O^j = W_O^j R^j


def value_gram(v_weight: Tensor, sigma_y: Tensor | None, heads: int) -> Tensor:
    """Per-head Gram of the values W_V^j y, (H, d_h, d_h): MoDeGPT's Type III statistic, blind to attention mixing.

    v_weight (H·d_h, C_y); sigma_y (C_y, C_y) the value-input moment, or None for Σ_y = I, with which
    ``vo_decompose`` becomes the data-free truncated SVD of W_O^j W_V^j (baseline of method.md §12.1).
    """
    device = sigma_y.device if sigma_y is not None else v_weight.device
    heads_v = _split_heads(v_weight.to(device=device, dtype=torch.float64), heads, "to_v")
    return _head_grams(heads_v, None if sigma_y is None else sigma_y.to(torch.float64))


def vo_decompose(
    v_weight: Tensor,
    o_weight: Tensor,
    gram: Tensor | None,
    heads: int,
    rank: int,
    *,
    ridge: float = 1e-4,
    v_bias: Tensor | None = None,
    o_bias: Tensor | None = None,
) -> VODecomposition:
    """Per-head rank-``rank`` whitening SVD of the value–output pair (method.md §6.3).

    v_weight (H·d_h, C_y); o_weight (C_out, H·d_h); gram (H, d_h, d_h) the per-head Gram of the attention output
    z (the input of ``to_out.0``), or ``value_gram(...)`` for MoDeGPT's statistic, or None for G = I (data-free:
    SVD of W_O^j alone). With G + ridge·tr(G)/d_h·I = L Lᵀ and W_O^j L = U diag(σ) Vᵀ the new head is
    Ŵ_V^j = V_rᵀ L⁻¹ W_V^j and Ŵ_O^j = W_O^j L V_r; because attention is linear in the values, ẑ^j = V_rᵀL⁻¹ z^j.
    v_bias, o_bias: the biases of ``to_v`` and ``to_out.0``. Each query's attention weights sum to one, so a value
    bias reaches the output as the constant W_O b_V: it is folded into the output bias exactly (``o_bias`` of the
    result) and the new value bias is zeros.
    """
    folded = None
    if v_bias is not None:
        if o_bias is None:
            raise ValueError("to_v has a bias but to_out.0 has none to fold it into")
        folded = (o_bias.to(torch.float64) + o_weight.to(torch.float64) @ v_bias.to(torch.float64)).to(o_bias)
    device = gram.device if gram is not None else v_weight.device
    wv = _split_heads(v_weight.to(device=device, dtype=torch.float64), heads, "to_v")
    head_dim = wv.shape[1]
    if o_weight.shape[1] != heads * head_dim or o_weight.shape[0] < head_dim:
        raise ValueError(f"output weight {tuple(o_weight.shape)} does not match {heads} heads of width {head_dim}")
    if gram is None:
        gram = torch.eye(head_dim, dtype=torch.float64, device=device).expand(heads, head_dim, head_dim)
    elif gram.shape != (heads, head_dim, head_dim):
        raise ValueError(f"gram must have shape {(heads, head_dim, head_dim)}, got {tuple(gram.shape)}")
    _check_rank(rank, head_dim, "VO per-head")

    wo = o_weight.to(device=device, dtype=torch.float64).reshape(-1, heads, head_dim).transpose(0, 1)  # (H, C, d_h)
    factor = cholesky(regularise(gram, ridge))
    left, singular_values, right_h = torch.linalg.svd(wo @ factor, full_matrices=False)
    basis = right_h[:, :rank].mT  # V_r, (H, d_h, r)
    to_v = torch.linalg.solve_triangular(factor.mT, basis, upper=True).mT  # V_rᵀ L⁻¹ via Lᵀ X = V_r
    new_v = to_v @ wv
    new_o = left[..., :rank] * singular_values[:, None, :rank]  # = W_O^j L V_r
    curve = _tail_sums(singular_values.square().sum(0))

    error, total = float(curve[rank]), float(curve[0])
    return VODecomposition(
        v_weight=new_v.reshape(heads * rank, -1).to(dtype=v_weight.dtype, device=v_weight.device),
        o_weight=new_o.transpose(0, 1).reshape(o_weight.shape[0], heads * rank).to(
            dtype=o_weight.dtype, device=o_weight.device
        ),
        singular_values=singular_values.cpu(),
        error=error,
        relative_error=error / total if total > 0 else 0.0,
        error_curve=curve.cpu(),
        v_bias=None if v_bias is None else v_weight.new_zeros(heads * rank),
        o_bias=folded,
        v_map=to_v.cpu(),
        o_map=(factor @ basis).cpu(),
    )


def vo_measured_error(
    v_weight: Tensor,
    o_weight: Tensor,
    new_v_weight: Tensor,
    new_o_weight: Tensor,
    value_moment: Tensor,
    heads: int,
) -> float:
    """Σ_j E‖(W_O^jW_V^j − Ŵ_O^jŴ_V^j) ȳ^j‖² on the second moment of the attention-mixed value input ȳ^j.

    Weights in the layouts of ``vo_decompose`` (original and new); value_moment (C_y, C_y) shared by all heads,
    or (H, C_y, C_y) per head. With Σ_ȳ^j the moment of ȳ^j = Σ_s a_s y_s, W_V^j Σ_ȳ^j W_V^jᵀ is the G_z of
    ``vo_decompose``, so this measures its error with no access to its internal maps.
    """
    device = value_moment.device
    as64 = lambda t: t.to(device=device, dtype=torch.float64)  # noqa: E731
    wv, nv = _split_heads(as64(v_weight), heads, "to_v"), _split_heads(as64(new_v_weight), heads, "new to_v")
    wo = as64(o_weight).reshape(o_weight.shape[0], heads, -1).transpose(0, 1)
    no = as64(new_o_weight).reshape(new_o_weight.shape[0], heads, -1).transpose(0, 1)
    diff = wo @ wv - no @ nv  # (H, C_out, C_y)
    moment = as64(value_moment).expand(heads, *value_moment.shape[-2:])
    return float(torch.einsum("hca,hab,hcb->", diff, moment, diff))
