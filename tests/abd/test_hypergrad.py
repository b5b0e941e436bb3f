"""The fixed-point hypergradient against closed forms and finite differences."""

from __future__ import annotations

import pytest
import torch

from kdguard.abd import fixed_point_hypergradient
from kdguard.errors import KDGuardError


def _quadratic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    h = a @ a.T + 3 * torch.eye(3, dtype=torch.float64)  # SPD: δ* = H⁻¹Bθ
    b = torch.randn(3, 2, generator=g, dtype=torch.float64)
    c = torch.randn(3, generator=g, dtype=torch.float64)
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)

    def inner(d):
        return 0.5 * d @ h @ d - d @ (b @ theta)

    d_star = torch.linalg.solve(h, b @ theta.detach())
    step = 1.0 / torch.linalg.eigvalsh(h).max().item()  # contraction: ρ(I − αH) < 1
    return h, b, c, theta, inner, d_star, step


def test_quadratic_problem_matches_the_implicit_function_theorem_and_finite_differences():
    h, b, c, theta, inner, d_star, step = _quadratic()

    def outer(d):
        return ((d - c) ** 2).sum() + 0.5 * (theta**2).sum() + d.sum() * theta[0]

    def total(th):
        d = torch.linalg.solve(h, b @ th)
        return ((d - c) ** 2).sum() + 0.5 * (th**2).sum() + d.sum() * th[0]

    grad, = fixed_point_hypergradient(d_star, [theta], inner, outer, steps=400, step_size=step)
    eps = 1e-6
    fd = torch.stack([(total(theta.detach() + eps * e) - total(theta.detach() - eps * e)) / (2 * eps)
                      for e in torch.eye(2, dtype=torch.float64)])
    assert torch.allclose(grad, fd, atol=1e-6)
    exact, = torch.autograd.grad(total(theta), theta)
    assert torch.allclose(grad, exact, atol=1e-8)


def test_truncation_and_the_direct_term():
    _, _, c, theta, inner, d_star, step = _quadratic()

    def outer(d):
        return ((d - c) ** 2).sum() + (theta**2).sum()

    direct, = fixed_point_hypergradient(d_star, [theta], inner, outer, steps=0)
    assert torch.allclose(direct, 2 * theta.detach())  # only ∂_θ ℓ_out
    errors = []
    exact = fixed_point_hypergradient(d_star, [theta], inner, outer, steps=500, step_size=step)[0]
    for k in (1, 5, 25):
        approx = fixed_point_hypergradient(d_star, [theta], inner, outer, steps=k, step_size=step)[0]
        errors.append(float((approx - exact).norm()))
    assert errors[0] > errors[1] > errors[2]  # the Neumann series converges


def test_k_steps_are_the_truncated_neumann_series_with_k_minus_1_products(monkeypatch):
    h, b, c, theta, inner, d_star, step = _quadratic()

    def outer(d):
        return ((d - c) ** 2).sum() + d.sum() * theta[0]

    # the series by hand: v = sum_{k<K} (I - step*H)^k g, dF/dtheta = direct + (d Phi/d theta)^T v
    g = 2 * (d_star - c) + theta[0].detach()
    v, term = torch.zeros(3, dtype=torch.float64), g.clone()
    for _ in range(5):
        v, term = v + term, term - step * h @ term
    by_hand = torch.tensor([d_star.sum().item(), 0.0], dtype=torch.float64) + step * (b.T @ v)
    calls = []
    grad = torch.autograd.grad

    def counting(outputs, inputs, *args, **kwargs):
        calls.append(kwargs.get("grad_outputs") is not None)
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    result, = fixed_point_hypergradient(d_star, [theta], inner, outer, steps=5, step_size=step)
    assert torch.allclose(result, by_hand, atol=1e-12)
    # outer grads, inner grad, K-1 = 4 products in the loop, the indirect term: v = 0 needs none
    assert calls.count(True) == 4 + 1


def _kl64(p_logits, q_logits):
    """Batch-mean KL(softmax p ‖ softmax q) in float64 (the library's KL runs in float32)."""
    log_p, log_q = p_logits.log_softmax(1), q_logits.log_softmax(1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def test_sr_shaped_problem_on_a_tiny_network_matches_finite_differences():
    """ℓ_in = −KL(S(x)‖S(x+δ)) + λ‖δ − u‖², ℓ_out = KL(S(x)‖S(x+δ)) + ‖δ − v‖² on a 2-layer
    net in float64. (u ≠ 0 moves δ* off the trivial stationary point δ = 0.)"""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 4, generator=g, dtype=torch.float64)
    w1 = (0.5 * torch.randn(6, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    w2 = (0.5 * torch.randn(3, 6, generator=g, dtype=torch.float64)).requires_grad_(True)
    u = torch.tensor([[0.5, -0.4, 0.3, 0.2]], dtype=torch.float64)
    v = torch.tensor([[0.2, -0.1, 0.3, 0.0]], dtype=torch.float64)
    lam = 1.0  # strongly convex inner problem: δ* is unique and found by gradient descent

    def net(inp, a, b):
        return torch.tanh(inp @ a.T) @ b.T

    def inner_value(a, b, d):
        return -_kl64(net(x, a, b), net(x + d, a, b)) + lam * ((d - u) ** 2).sum()

    def outer_value(a, b, d):
        return _kl64(net(x, a, b), net(x + d, a, b)) + ((d - v) ** 2).sum()

    def solve(a, b):
        d = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
        for _ in range(300):  # contraction ≈ 1 − 0.2·2λ per step
            gd, = torch.autograd.grad(inner_value(a, b, d), d)
            d = (d - 0.2 * gd).detach().requires_grad_(True)
        return d.detach()

    d_star = solve(w1.detach(), w2.detach())
    assert d_star.abs().max() > 0.1
    grads = fixed_point_hypergradient(d_star, [w1, w2], lambda d: inner_value(w1, w2, d),
                                      lambda d: outer_value(w1, w2, d), steps=200, step_size=0.2)
    eps = 1e-6
    for which, grad in enumerate(grads):
        for idx in [(0, 0), (1, 2), (2, 1)]:
            values = []
            for sign in (1, -1):
                a, b = w1.detach().clone(), w2.detach().clone()
                (a, b)[which][idx] += sign * eps
                values.append(outer_value(a, b, solve(a, b)))
            fd = (values[0] - values[1]) / (2 * eps)
            assert grad[idx].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-9)


def test_bad_arguments():
    d = torch.zeros(2, dtype=torch.float64)
    frozen = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(KDGuardError, match="require gradients"):
        fixed_point_hypergradient(d, [frozen], lambda v: v.sum(), lambda v: v.sum())
    with pytest.raises(KDGuardError, match="steps"):
        fixed_point_hypergradient(d, [frozen.requires_grad_()], lambda v: v.sum(), lambda v: v.sum(), steps=-1)


def test_unused_parameters_get_zeros():
    theta = torch.ones(2, requires_grad=True)
    unused = torch.ones(3, requires_grad=True)
    grads = fixed_point_hypergradient(torch.zeros(2), [theta, unused],
                                      lambda d: ((d - theta) ** 2).sum(), lambda d: (d**2).sum(),
                                      steps=3, step_size=0.25)
    assert grads[1].shape == (3,) and not grads[1].any()
