"""Implicit hypergradient of a bi-level problem by fixed-point iteration (I-BAU / ABD's SR).

Problem::

    min_θ  F(θ) = ℓ_out(δ*(θ), θ)
    s.t.   δ*(θ) = Φ(δ*(θ), θ),   Φ(δ, θ) = δ − α ∇_δ ℓ_in(δ, θ)     (δ* a stationary point of ℓ_in)

By the implicit function theorem, with J = ∂_δ Φ at (δ*, θ)::

    dF/dθ = ∂_θ ℓ_out + (∂_θ Φ)ᵀ v,    v = (I − Jᵀ)⁻¹ ∂_δ ℓ_out

and ``v`` is approximated by K fixed-point iterations ``v ← Jᵀ v + ∂_δ ℓ_out`` from ``v = 0``,
i.e. the truncated Neumann series Σ_{k<K} (Jᵀ)^k ∂_δ ℓ_out. This is the fixed-point method of
Grazzi et al. (ICML 2020, "On the iteration complexity of hypergradient computation"), used by
I-BAU (Zeng et al., ICLR 2022) and by ABD's Self-Retrospection (their ``hypergrad.fixed_point``
with K = 5, α = 0.1). Each iteration after the first (which starts from v = 0 and so gives
∂_δ ℓ_out without a product) costs one vector–Jacobian product of ∇_δ ℓ_in (a double-backward pass); the series converges when the spectral radius of J is below 1
(ℓ_in smooth and α small enough), and the error of truncating it after K terms decays like ρ^K.

kdguard's own implementation: no state, explicit arguments, parameters without gradient path
get zeros (not ``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import KDGuardError


def fixed_point_hypergradient(inner_solution: torch.Tensor, params: Sequence[torch.Tensor],
                              inner_loss: Callable[[torch.Tensor], torch.Tensor],
                              outer_loss: Callable[[torch.Tensor], torch.Tensor], *,
                              steps: int = 5, step_size: float = 0.1,
                              tol: float = 0.0) -> list[torch.Tensor]:
    """dF/dθ of ``F(θ) = outer_loss(δ*(θ))`` at ``δ* = inner_solution`` (see the module docstring).

    Args:
        inner_solution: δ*, any shape (ABD: the universal perturbation ``1×C×H×W``); used
            detached, so how it was found does not matter.
        params: θ, the tensors to differentiate with respect to (``requires_grad=True``).
        inner_loss: ``δ -> scalar`` ℓ_in(δ, θ), built from ``params`` (differentiable twice).
        outer_loss: ``δ -> scalar`` ℓ_out(δ, θ).
        steps: K fixed-point iterations (K = 0 keeps only the direct term ∂_θ ℓ_out).
        step_size: α of the gradient-descent map Φ.
        tol: stop early when ‖v_{k+1} − v_k‖ < tol (0 = always K iterations, no host sync).

    Returns:
        One gradient per parameter, same shapes (zeros where ``F`` does not depend on it).

    Raises:
        KDGuardError: a parameter does not require gradients, or ``steps < 0``.
    """
    params = list(params)
    if steps < 0:
        raise KDGuardError(f"hypergradient steps {steps} must be >= 0", "use e.g. 5")
    if not params or not all(p.requires_grad for p in params):
        raise KDGuardError("every parameter of the hypergradient must require gradients",
                           "pass the trainable parameters (p.requires_grad is True)")
    delta = inner_solution.detach().requires_grad_(True)

    outer = outer_loss(delta)
    grads = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
    g_delta = grads[0] if grads[0] is not None else torch.zeros_like(delta)
    direct = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[1:], params)]
    if steps == 0:
        return direct

    inner_grad, = torch.autograd.grad(inner_loss(delta), delta, create_graph=True)
    mapped = delta - step_size * inner_grad  # Φ(δ, θ), differentiable in δ and θ
    # the first iteration from v = 0 gives v = ∂_δ ℓ_out exactly (Jᵀ·0 = 0): no product needed
    v = g_delta
    converged = tol > 0 and float(torch.linalg.vector_norm(v)) < tol
    for _ in range(steps - 1):
        if converged:
            break
        jv, = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True, allow_unused=True)
        v_next = g_delta if jv is None else jv + g_delta
        converged = tol > 0 and float(torch.linalg.vector_norm(v_next - v)) < tol
        v = v_next
    indirect = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [d if i is None else d + i for d, i in zip(direct, indirect)]
