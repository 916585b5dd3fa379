"""Stage C — spectral influence (TRQ), timestep fidelity weights and module scores (method.md §5).

The trace-normalised Rayleigh quotient of an operator A on an input with second moment Σ (input width d),

    ρ(A, Σ) = (tr(AΣAᵀ) / trΣ) / (‖A‖_F² / d),

compares the energy gain A has on the real activations with its average gain on isotropic input: ρ = 1 for
isotropic Σ, ρ > 1 when the activations sit in A's high-gain directions. It is invariant to rescaling A or Σ.

Every function computes in float64 and is vectorised over leading (timestep) axes of the statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as64(value) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def trq(weight: Tensor, moment: Tensor) -> Tensor:
    """ρ(A, Σ) for A = ``weight`` (out, d) and ``moment`` (..., d, d) → (...)."""
    weight, moment = _as64(weight), _as64(moment).to(weight.device)
    gain = weight.T @ weight  # tr(AΣAᵀ) = Σ_ij (AᵀA)_ij Σ_ji
    output_energy = torch.einsum("ij,...ji->...", gain, moment)
    input_energy = moment.diagonal(dim1=-2, dim2=-1).sum(-1)
    return trq_from_energies(output_energy, input_energy, gain.trace(), weight.shape[1])


def trq_from_energies(output_energy, input_energy, weight_fro2, in_dim: int) -> Tensor:
    """ρ from scalar energies E‖Ax‖², E‖x‖² (broadcast, e.g. one entry per timestep), ‖A‖_F² and d.

    For hooks that accumulate ``‖Ax‖²`` and ``‖x‖²`` on the fly and never store a d × d matrix.
    """
    return (_as64(output_energy) / _as64(input_energy)) / (_as64(weight_fro2) / in_dim)


def trq_qk(q_weight: Tensor, k_weight: Tensor, gram_q: Tensor, gram_k: Tensor, trace_x, trace_y,
           heads: int) -> Tensor:
    """Head-averaged bilinear TRQ of the logit forms M_j = W_Q^jᵀ W_K^j (method.md §5.1, Type II).

    ρ_j = [tr(M_jᵀ Σ_x M_j Σ_y) / (trΣ_x trΣ_y)] / [‖M_j‖_F² / (C_x C_y)]. The numerator is tr(G_q G_k) with the
    head Grams G_q = W_Q^j Σ_x W_Q^jᵀ = E[q_j q_jᵀ] and G_k = W_K^j Σ_y W_K^jᵀ, so calibration keeps d×d Grams of
    the projected tokens per timestep and never a C_x × C_y (or even C × C) matrix per timestep.
    q_weight (H·d_h, C_x), k_weight (H·d_h, C_y); gram_q (..., H, d_h, d_h) and gram_k broadcast against it (a
    constant text-key Gram with per-timestep query Grams); trace_x = trΣ_x, trace_y = trΣ_y broadcast likewise
    (...) → (...).
    """
    wq = _as64(q_weight).reshape(heads, -1, q_weight.shape[1])
    wk = _as64(k_weight).reshape(heads, -1, k_weight.shape[1])
    gram_q, gram_k = _as64(gram_q).to(wq.device), _as64(gram_k).to(wq.device)
    logit_energy = (gram_q * gram_k).sum((-2, -1))  # tr(G_q G_k), both symmetric
    weight_energy = ((wq @ wq.mT) * (wk @ wk.mT)).sum((-2, -1))  # ‖M_j‖_F²
    traces = _as64(trace_x).to(wq.device) * _as64(trace_y).to(wq.device)
    rho = (logit_energy / traces[..., None]) / (weight_energy / (wq.shape[2] * wk.shape[2]))
    return rho.mean(-1)


def trq_vo(o_weight: Tensor, gram_z: Tensor, heads: int) -> Tensor:
    """Head-averaged TRQ of the output projection on the attention output: A = W_O^j, Σ = G_z^j (Type III).

    o_weight (C_out, H·d_h); gram_z (..., H, d_h, d_h) per-head Grams of the input of ``to_out.0`` → (...).
    """
    wo = _as64(o_weight).reshape(o_weight.shape[0], heads, -1).transpose(0, 1)  # (H, C_out, d_h)
    gram_z = _as64(gram_z).to(wo.device)
    gain = wo.mT @ wo  # (H, d_h, d_h)
    output_energy = torch.einsum("hij,...hji->...h", gain, gram_z)
    input_energy = gram_z.diagonal(dim1=-2, dim2=-1).sum(-1)
    weight_energy = gain.diagonal(dim1=-2, dim2=-1).sum(-1)
    return trq_from_energies(output_energy, input_energy, weight_energy, wo.shape[2]).mean(-1)


def timestep_weights(rho: Tensor, gamma: float = 1.0, prior: Tensor | None = None) -> Tensor:
    """Fidelity weights w_t ∝ π_t ρ_t^γ over the last axis (timesteps), summing to 1 (method.md §5.2).

    rho (..., T) non-negative TRQs; prior (T,) or broadcastable, default uniform. γ = 0 with no prior gives
    uniform pooling.
    """
    rho = _as64(rho)
    if not bool(torch.isfinite(rho).all()) or bool((rho < 0).any()):
        raise ValueError("TRQ values must be finite and non-negative")
    weights = rho.pow(gamma)
    if prior is not None:
        prior = _as64(prior).to(rho.device)
        if bool((prior < 0).any()):
            raise ValueError("the timestep prior must be non-negative")
        weights = weights * prior
    total = weights.sum(-1, keepdim=True)
    if not bool((total > 0).all()):
        raise ValueError("timestep weights are all zero for some module (TRQ or prior vanish on every step)")
    return weights / total


def module_scores(
    rho: Tensor, weights: Tensor, propagation: Tensor | None = None, beta: float = 1.0
) -> Tensor:
    """Min–max normalised spectral-influence scores ŝ_m ∈ [0, 1] (method.md §5.3).

    s_m = (Σ_t w_{m,t} ρ_{m,t}) · (Σ_t w_{m,t} π_{m,t})^β with π the relative residual-update energy of the
    module (``propagation``; omitted means no propagation factor). rho, weights, propagation: (M, T), or any
    shapes broadcasting to it (e.g. global weights (T,)) → (M,). All-equal scores map to zeros.
    """
    rho, weights = _as64(rho), _as64(weights)
    scores = (weights * rho).sum(-1)
    if propagation is not None:
        scores = scores * (weights * _as64(propagation)).sum(-1).pow(beta)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("module scores are not finite (check the TRQ and propagation statistics)")
    spread = scores.max() - scores.min()
    if spread <= 0:
        return torch.zeros_like(scores)
    return (scores - scores.min()) / spread
