"""Self-Retrospection: the perturbation, the phase, and one unlearning step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdguard.abd import SelfRetrospection, frozen_bn_statistics, universal_perturbation
from kdguard.abd import SelfRetrospectionConfig
from kdguard.datafree.losses import kl_per_sample
from kdguard.errors import KDGuardError
from kdguard.datafree.student import (
    DistillObjective,
    StudentStepContext,
    TeacherOutputs,
    default_student_step,
)


def _student(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _context(abd_kit, student, round_index, total_rounds=10, x=None):
    teacher = abd_kit.ShortcutNet()
    x = abd_kit.clean_images(16) if x is None else x
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    with torch.no_grad():
        t = teacher(x)
    return StudentStepContext(student=student, teacher=teacher, optimizer=opt, x=x,
                              teacher_outputs=TeacherOutputs(t), objective=DistillObjective(),
                              round_index=round_index, total_rounds=total_rounds, grad_clip=5.0)


def test_universal_perturbation_is_one_image_and_raises_the_divergence(abd_kit):
    teacher = abd_kit.ShortcutNet()
    x = abd_kit.clean_images(32)
    ref = teacher(x)
    delta = universal_perturbation(teacher, x, ref, steps=10, lr=0.1, l2=1e-3)
    assert delta.shape == (1, *abd_kit.SHAPE) and not delta.requires_grad
    assert kl_per_sample(ref, teacher(x + delta)).mean() > 0.1
    assert not any(p.grad is not None for p in teacher.parameters())
    assert torch.equal(universal_perturbation(teacher, x, ref, steps=0), torch.zeros(1, *abd_kit.SHAPE))


def test_phase_learning_rate_and_subset_size():
    sr = SelfRetrospection(SelfRetrospectionConfig(phase=0.02, lr=5e-4, share=0.02, min_count=8))
    assert sr.phase_start(1500) == 1470 and sr.phase_start(10) == 9  # at least one round
    assert not sr.in_phase(1469, 1500) and sr.in_phase(1470, 1500)
    assert sr.phase_lr(1470, 1500) == pytest.approx(5e-4)
    assert 0 < sr.phase_lr(1499, 1500) < 1e-5
    assert sr.perturbed_count(128) == 8 and sr.perturbed_count(1000) == 20 and sr.perturbed_count(4) == 4


def test_bn_statistics_stay_frozen_but_batch_statistics_are_used():
    model = _student()
    model.train()
    before = copy.deepcopy(model[1].state_dict())
    x = torch.rand(8, 3, 5, 5)
    with frozen_bn_statistics(model):
        out = model(x)
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, before[k]), k
    model.eval()
    assert not torch.allclose(out, model(x))  # train-mode (batch) statistics were used
    assert model[1].momentum == 0.1


def test_before_the_phase_it_is_the_plain_step(abd_kit):
    a, b = _student(), _student()
    ctx_a, ctx_b = _context(abd_kit, a, round_index=3), _context(abd_kit, b, round_index=3)
    out = SelfRetrospection(SelfRetrospectionConfig(phase=0.2))(ctx_a)
    default_student_step(ctx_b)
    assert set(out) == {"kd"}
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("hypergradient", [True, False])
@pytest.mark.parametrize("perturb_model", ["teacher", "student"])
def test_an_sr_step_unlearns_without_touching_the_teacher_or_bn_statistics(abd_kit, hypergradient,
                                                                            perturb_model):
    student, plain = _student(), _student()
    cfg = SelfRetrospectionConfig(phase=0.2, lr=1e-3, hypergradient=hypergradient,
                                  perturb_model=perturb_model, min_count=4)
    sr = SelfRetrospection(cfg)
    ctx = _context(abd_kit, student, round_index=8)
    ctx.optimizer.state[next(student.parameters())]["junk"] = 1  # must be cleared on entry
    teacher_before = copy.deepcopy(ctx.teacher.state_dict())
    out = sr(ctx)
    assert set(out) == {"kd", "sr_unlearn"} and all(torch.isfinite(v) for v in out.values())
    assert "junk" not in ctx.optimizer.state[next(student.parameters())]
    assert all(g["lr"] == pytest.approx(1e-3) for g in ctx.optimizer.param_groups)
    assert sr.entered and sr.steps == 1
    for k, v in ctx.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])
    # BN running statistics moved exactly as one plain KD forward moves them
    default_student_step(_context(abd_kit, plain, round_index=0))
    assert torch.allclose(student[1].running_mean, plain[1].running_mean)
    assert torch.allclose(student[1].running_var, plain[1].running_var)
    # the unlearning term changed the update
    assert not torch.allclose(student[0].weight, plain[0].weight)


def test_the_teacher_perturbation_is_computed_once_per_batch(abd_kit, monkeypatch):
    import kdguard.abd.retrospection as mod

    calls = []
    real = mod.universal_perturbation
    monkeypatch.setattr(mod, "universal_perturbation", lambda *a, **k: calls.append(1) or real(*a, **k))
    sr = SelfRetrospection(SelfRetrospectionConfig(phase=0.5, min_count=2))
    student = _student()
    ctx = _context(abd_kit, student, round_index=9)
    sr(ctx)
    sr(ctx)  # the same batch object (ZSKT: every student step of a round)
    assert len(calls) == 1
    sr(_context(abd_kit, student, round_index=9))
    assert len(calls) == 2


def test_state_round_trip():
    a = SelfRetrospection(seed=3)
    a.entered, a.steps, a.votes = True, 7, {0: 3, 4: 1}
    torch.randperm(10, generator=a.generator)
    b = SelfRetrospection(seed=4)
    b.load_state_dict(a.state_dict())
    assert (b.entered, b.steps, b.votes) == (True, 7, {0: 3, 4: 1})
    old = {k: v for k, v in a.state_dict().items() if k != "votes"}  # a checkpoint from before votes
    c = SelfRetrospection(seed=4)
    c.load_state_dict(old)
    assert c.votes == {}
    assert torch.equal(torch.randperm(10, generator=a.generator), torch.randperm(10, generator=b.generator))


def test_the_perturbation_lives_in_normalised_units(abd_kit):
    """f(x) = g(x / s): the u found for f with scale s is the u found for g on x / s."""
    g = abd_kit.ShortcutNet()
    s = torch.tensor([0.3, 0.5, 0.25]).view(1, 3, 1, 1)
    x = abd_kit.clean_images(16)

    def f(images):
        return g(images / s)

    u_f = universal_perturbation(f, x, f(x), steps=5, scale=s)
    u_g = universal_perturbation(g, x / s, g(x / s), steps=5)
    assert torch.allclose(u_f, u_g, atol=1e-5) and u_f.abs().max() > 0


def test_divergence_follows_the_method_when_asked(abd_kit):
    sr_kl = SelfRetrospection(SelfRetrospectionConfig(divergence="kl"))
    sr_method = SelfRetrospection(SelfRetrospectionConfig(divergence="method"))
    ctx = _context(abd_kit, _student(), round_index=0)
    ctx.objective = DistillObjective(temperature=4.0, reduction="batchmean", t2_scale=True)
    p, q = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.allclose(sr_kl.divergence(ctx)(p, q), kl_per_sample(p, q, reduction="batchmean"))
    expected = 16.0 * kl_per_sample(p, q, temperature=4.0, reduction="batchmean")
    assert torch.allclose(sr_method.divergence(ctx)(p, q), expected)
    ctx.objective = DistillObjective(reduction="mean")  # ZSKT: ÷K, τ = 1
    assert torch.allclose(sr_method.divergence(ctx)(p, q), kl_per_sample(p, q, reduction="batchmean") / 4)


def test_nchw_forward_matches_a_channels_last_student_to_second_order():
    """SR runs a channels_last student in NCHW (faster double backward on CPU): same logits,
    same gradients, same double-backward products."""
    from kdguard.abd.retrospection import nchw_forward

    plain = _student()
    assert nchw_forward(plain) is plain  # nothing to convert
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    forward = nchw_forward(cl)
    assert forward is not cl
    x = torch.rand(6, 3, 5, 5)
    d = torch.zeros(1, 3, 5, 5, requires_grad=True)
    results = []
    for model, fwd in ((plain, plain), (cl, forward)):
        out = fwd(x + d)
        g_d, = torch.autograd.grad(out.pow(2).sum(), d, create_graph=True)
        params = list(model.parameters())
        second = torch.autograd.grad(g_d.sum(), params)
        results.append((out, g_d, second))
    (o1, g1, s1), (o2, g2, s2) = results
    assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(g1, g2, atol=1e-5)
    for a, b in zip(s1, s2):
        assert torch.allclose(a, b, atol=1e-4)


def test_an_sr_step_on_a_channels_last_student_equals_the_nchw_step(abd_kit):
    a = _student()
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    cfg = SelfRetrospectionConfig(phase=0.2, min_count=4)
    x = abd_kit.clean_images(16)
    outs = []
    for student in (a, b):
        ctx = _context(abd_kit, student, round_index=8, x=x)
        ctx.optimizer = torch.optim.SGD(student.parameters(), lr=0.1)  # Adam's first step ≈ sign(g)
        outs.append(SelfRetrospection(cfg)(ctx))
    assert torch.allclose(outs[0]["sr_unlearn"], outs[1]["sr_unlearn"], atol=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


@pytest.mark.parametrize("amp", [False, True])
def test_the_unlearning_term_is_zero_at_zero_perturbation_in_either_precision(abd_kit, amp):
    """The clean logits come from the precision of the SR passes, so KL(S(x) ‖ S(x + 0)) = 0 even
    when the distillation forward runs under bf16 autocast."""
    cfg = SelfRetrospectionConfig(phase=0.2, min_count=4, inner_steps=0, amp=amp)
    ctx = _context(abd_kit, _student(), round_index=8)
    ctx.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    out = SelfRetrospection(cfg)(ctx)
    assert out["sr_unlearn"].item() == 0.0 and torch.isfinite(out["kd"])


def test_sr_in_bf16_stays_close_to_float32(abd_kit):
    """amp=True: one SR update within a few per cent of the float32 update."""
    base = _student()
    x = abd_kit.clean_images(16)
    updates = []
    for amp in (False, True):
        student = copy.deepcopy(base)
        ctx = _context(abd_kit, student, round_index=8, x=x)
        ctx.optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        ctx.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
        SelfRetrospection(SelfRetrospectionConfig(phase=0.2, min_count=4, lr=0.1, amp=amp))(ctx)
        updates.append(torch.cat([(p - q).flatten() for p, q in zip(student.parameters(), base.parameters())]))
    f32, bf16 = updates
    assert f32.norm() > 0
    cos = torch.nn.functional.cosine_similarity(f32, bf16, dim=0)
    assert cos > 0.95 and not torch.equal(f32, bf16)  # close, and bf16 really ran


def test_a_given_trigger_is_unlearnt_on_the_chosen_samples_without_a_search(abd_kit, monkeypatch):
    import kdguard.abd.retrospection as retrospection

    def no_search(*args, **kwargs):
        raise AssertionError("no δ search with a given trigger")

    monkeypatch.setattr(retrospection, "universal_perturbation", no_search)
    stamped_rows = []

    def trigger(x):  # a bright corner
        stamped_rows.append(len(x))
        out = x.clone()
        out[:, :, :3, :3] = 1.0
        return out

    student, plain = _student(), _student()
    cfg = SelfRetrospectionConfig(phase=0.2, lr=1e-3, min_count=4, weight=5.0)
    sr = SelfRetrospection(cfg, trigger=trigger)
    ctx = _context(abd_kit, student, round_index=8)
    out = sr(ctx)
    assert set(out) == {"kd", "sr_unlearn"} and float(out["sr_unlearn"]) > 0
    assert stamped_rows == [16] and sr.steps == 1
    assert sr.summary()["perturbation"] == "given trigger" and sr.summary()["hypergradient"] is False
    # the unlearning term changed the update against the plain step
    default_student_step(_context(abd_kit, plain, round_index=0))
    assert not torch.allclose(student[0].weight, plain[0].weight)
    # and repeated steps shrink the student's response to the trigger on the same images
    x = abd_kit.clean_images(16)
    student2 = _student()
    sr2 = SelfRetrospection(SelfRetrospectionConfig(phase=1.0, lr=1e-2, min_count=16, weight=50.0), trigger=trigger)
    gaps = []
    for i in range(15):
        out = sr2(_context(abd_kit, student2, round_index=i, total_rounds=100, x=x))
        gaps.append(float(out["sr_unlearn"]))
    assert gaps[-1] < gaps[0]


def test_a_given_trigger_can_be_pulled_to_the_teachers_clean_output(abd_kit):
    def trigger(x):
        out = x.clone()
        out[:, :, :3, :3] = 1.0
        return out

    runs = {}
    for reference in ("student", "teacher"):
        student = _student()
        sr = SelfRetrospection(SelfRetrospectionConfig(phase=0.2, lr=1e-3, min_count=16, audit_reference=reference),
                               trigger=trigger)
        out = sr(_context(abd_kit, student, round_index=8))
        runs[reference] = (float(out["sr_unlearn"]), student[0].weight.detach().clone())
        assert sr.summary()["audit_reference"] == reference
    # the student's clean output and the teacher's differ, so the terms and the updates differ
    assert runs["student"][0] != pytest.approx(runs["teacher"][0])
    assert not torch.allclose(runs["student"][1], runs["teacher"][1])


def test_the_sparse_search_puts_its_mass_on_the_trigger_pixel():
    from kdguard.abd import target_directed_perturbation

    # 1×6×6 images, 3 classes: classes 0 and 1 read the left and the right half; the target (2)
    # reads every pixel weakly (a dense "natural" route) and one corner pixel strongly (the trigger)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    with torch.no_grad():
        w = torch.zeros(3, 36)
        left = torch.arange(36) % 6 < 3
        w[0, left], w[1, ~left] = 1.0, 1.0
        w[2] = 0.3
        w[2, 35] = 30.0
        model[1].weight.copy_(w)
        model[1].bias.copy_(torch.tensor([0.0, 0.0, -8.0]))
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(64, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 0.5
    x[..., 5, 5] = 0.0  # clean images leave the trigger pixel dark
    assert (model(x).argmax(1) == 2).float().mean() == 0.0
    u = target_directed_perturbation(model, x, 2, steps=100, lr=0.1, l1=0.01)
    assert u.shape == (1, 1, 6, 6) and not u.requires_grad
    mass = u.abs().flatten()
    assert mass[35] > 0.6 * mass.sum() and mass[35] > 20 * mass[:35].max()  # the trigger pixel, not the dense route
    assert (model(x + u).argmax(1) == 2).float().mean() > 0.9


def test_a_sparse_sr_step_names_the_target_and_skips_the_hypergradient(abd_kit, monkeypatch):
    import kdguard.abd.retrospection as mod

    def no_hypergradient(*args, **kwargs):
        raise AssertionError("a sparse δ solves no inner problem of the student")

    monkeypatch.setattr(mod, "fixed_point_hypergradient", no_hypergradient)
    sr = SelfRetrospection(SelfRetrospectionConfig(phase=0.2, search="sparse", inner_lr=0.3, min_count=4))
    student = _student()
    out = sr(_context(abd_kit, student, round_index=9))
    assert torch.isfinite(out["sr_unlearn"]) and sr.target == abd_kit.TARGET
    summary = sr.summary()
    assert summary["perturbation"] == "sparse search" and not summary["hypergradient"]
    assert summary["suspected_target"] == abd_kit.TARGET


def test_the_logit_unlearning_term_ignores_a_shift_of_one_class():
    from kdguard.abd.retrospection import centred_logit_distance

    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(centred_logit_distance(a, a + 5.0), torch.zeros(2))  # a constant per sample
    shift = torch.tensor([0.0, 0.0, -4.0])  # the target's logit lowered everywhere, alike in both
    b = a + torch.tensor([[0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(centred_logit_distance(a + shift, b + shift), centred_logit_distance(a, b))
    # by hand: b − a = (0, 0, 2) → centred (−2/3, −2/3, 4/3) → 4/9 + 4/9 + 16/9 = 8/3
    assert centred_logit_distance(a, b)[0] == pytest.approx(8 / 3)


def _corner(x):
    out = x.clone()
    out[:, :, :3, :3] = 1.0
    return out


@pytest.mark.parametrize("variant", ["hypergradient", "direct", "given trigger"])
def test_modules_confine_the_unlearning_gradient_to_the_named_parameters(abd_kit, variant):
    def step(weight):
        student = _student()
        cfg = SelfRetrospectionConfig(phase=0.2, lr=1e-2, min_count=8, weight=weight, modules=["5"],
                                      hypergradient=variant == "hypergradient")
        sr = SelfRetrospection(cfg, trigger=_corner if variant == "given trigger" else None)
        sr(_context(abd_kit, student, round_index=8))
        return dict(student.named_parameters())

    plain, unlearnt = step(0.0), step(50.0)
    for name in ("0.weight", "0.bias", "1.weight", "1.bias"):  # outside "5": the KD update alone
        assert torch.equal(plain[name], unlearnt[name]), name
    assert not torch.allclose(plain["5.weight"], unlearnt["5.weight"])


def test_modules_select_parameters_by_path_and_reject_an_unknown_one():
    student = _student()
    sr = SelfRetrospection(SelfRetrospectionConfig(modules=["0", "5.bias"]))
    assert [p.shape for p in sr.unlearn_parameters(student)] == [(6, 3, 3, 3), (6,), (4,)]
    assert len(SelfRetrospection().unlearn_parameters(student)) == 6
    with pytest.raises(KDGuardError, match="abd.sr.modules: module path 'fc9' does not exist.*valid paths: 0, 1, 2, 3, 4, 5"):
        SelfRetrospection(SelfRetrospectionConfig(modules=["fc9"])).unlearn_parameters(student)
    with pytest.raises(KDGuardError, match="'2', which holds no trainable parameter"):  # the ReLU
        SelfRetrospection(SelfRetrospectionConfig(modules=["2"])).unlearn_parameters(student)
