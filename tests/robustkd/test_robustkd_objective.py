"""The detox objective: hand-checked term values, input errors, and what it removes on tiny
backdoors (a planted dormant channel, and a briefly trained backdoored convnet)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdguard.defenses.robustkd import DetoxObjective, StageStats, detoxify
from kdguard.errors import KDGuardError
from kdguard.losses.logit import kd_loss


def _stats(var_channel, var_element=None) -> StageStats:
    c = len(var_channel)
    var_element = var_element if var_element is not None else torch.ones(c, 1, 2)
    return StageStats(mean=torch.zeros(c, 1, 2), var_channel=torch.tensor(var_channel),
                      var_element=var_element, act_mean=torch.zeros(c), count=10)


def test_dormant_terms_match_the_equations():
    obj = DetoxObjective(ce_weight=2.0, kd_weight=0.5, temperature=3.0, sparsity_weight=0.4, variance_weight=0.3)
    logits, teacher, y = torch.randn(6, 3), torch.randn(6, 3), torch.arange(6) % 3
    masks = {"a": torch.tensor([0.0, 1.0, 0.5]).view(3, 1, 1), "b": torch.tensor([1.0, 1.0]).view(2, 1, 1)}
    stats = {"a": _stats([1.0, 2.0, 3.0]), "b": _stats([4.0, 0.0])}
    losses = obj(logits, teacher, y, masks, stats)
    assert losses["ce"].item() == pytest.approx(2.0 * F.cross_entropy(logits, y).item(), rel=1e-6)
    assert losses["kd"].item() == pytest.approx(0.5 * kd_loss(logits, teacher, temperature=3.0).item(), rel=1e-6)
    mean_mask = (1.5 / 3 + 1.0) / 2  # mean over stages of the stage means
    assert losses["sparsity"].item() == pytest.approx(0.4 * (1 - mean_mask), rel=1e-6)
    # v̂ = Var / mean(Var): stage a → [0.5, 1, 1.5], stage b → [2, 0]
    expected_var = ((0 * 0.5 + 1 * 1.0 + 0.5 * 1.5) / 3 + (1 * 2 + 1 * 0) / 2) / 2
    assert losses["variance"].item() == pytest.approx(0.3 * expected_var, rel=1e-5)


def test_variance_form_terms():
    obj = DetoxObjective(form="variance", ce_weight=1.0, kd_weight=0.0, feature_variance_weight=2.0,
                         mask_size_weight=0.5)
    feats = torch.randn(8, 2, 1, 2).clamp_min(0)
    var = feats.transpose(0, 1).flatten(1).var(1, unbiased=False)
    stats = {"s": StageStats(mean=torch.zeros(2, 1, 2), var_channel=var, var_element=torch.ones(2, 1, 2),
                             act_mean=torch.zeros(2), count=8)}
    masks = {"s": torch.full((2, 1, 1), 0.25)}
    losses = obj(torch.randn(8, 3), None, torch.zeros(8, dtype=torch.long), masks, stats, features={"s": feats})
    assert set(losses) == {"ce", "feature_variance", "mask_size"}
    assert losses["feature_variance"].item() == pytest.approx(2.0, rel=1e-4)  # unchanged features: ratio 1
    assert losses["mask_size"].item() == pytest.approx(0.125)


def test_adversarial_term_is_kd_on_the_perturbed_logits():
    obj = DetoxObjective(kd_weight=0.0, sparsity_weight=0.0, variance_weight=0.0, adversarial_weight=0.7,
                         temperature=2.0)
    logits, teacher, adv, y = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3), torch.arange(5) % 3
    losses = obj(logits, teacher, y, {"a": torch.zeros(2, 1, 1)}, {"a": _stats([1.0, 1.0])}, adversarial_logits=adv)
    assert set(losses) == {"ce", "adversarial"}
    assert losses["adversarial"].item() == pytest.approx(0.7 * kd_loss(adv, teacher, temperature=2.0).item(), rel=1e-6)
    assert obj.adversarial and not DetoxObjective().adversarial
    with pytest.raises(KDGuardError, match="adversarial term needs"):
        obj(logits, teacher, y, {"a": torch.zeros(2, 1, 1)}, {"a": _stats([1.0, 1.0])})


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(form="magic"), "unknown detox objective form"),
    (dict(epsilon=0.0), "epsilon=0.0 is outside (0, 1]"),
    (dict(adversarial_step=2.0), "adversarial_step=2.0"),
    (dict(adversarial_weight=float("nan")), "adversarial_weight"),
    (dict(ce_weight=0.0, kd_weight=0.0), "both detox fidelity weights"),
    (dict(sparsity_weight=-1.0), "sparsity_weight=-1.0"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_settings(kwargs, fragment):
    with pytest.raises(KDGuardError) as err:
        DetoxObjective(**kwargs)
    assert fragment in str(err.value)


def test_missing_inputs_are_errors():
    masks, stats = {"a": torch.zeros(2, 1, 1)}, {"a": _stats([1.0, 1.0])}
    with pytest.raises(KDGuardError, match="needs labels"):
        DetoxObjective()(torch.randn(2, 3), torch.randn(2, 3), None, masks, stats)
    with pytest.raises(KDGuardError, match="original teacher"):
        DetoxObjective()(torch.randn(2, 3), None, torch.zeros(2, dtype=torch.long), masks, stats)
    with pytest.raises(KDGuardError, match="no clean statistics"):
        DetoxObjective()(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), masks, {})
    with pytest.raises(KDGuardError, match="detoxified features"):
        DetoxObjective(form="variance")(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
                                        masks, stats)
    with pytest.raises(KDGuardError, match="granularity"):
        DetoxObjective()(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, dtype=torch.long),
                         {"a": torch.zeros(2, 1, 2)}, stats, granularity="channel")


def _asr(ns, model) -> float:
    x = ns.x_test[ns.y_test != 0]
    return ns.accuracy(model, ns.trigger(x), torch.zeros(len(x), dtype=torch.long))


@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_dormant_form_removes_a_planted_backdoor_channel(planted, granularity):
    # λ_s 0.5: on this 4-channel toy the default λ_s 1 buys a 0.13 mask on the clean channels too
    result = detoxify(planted.model, planted.x, planted.y, paths=["stage"], granularity=granularity,
                      objective=DetoxObjective(sparsity_weight=0.5), epochs=15, batch_size=64, lr=0.1)
    mask = result.detox.channel_masks()["stage"]
    assert mask[planted.trigger_channel] > 0.9  # the dormant backdoor channel is replaced
    assert mask[0] < 0.1 and mask[3] < 0.1  # the channels carrying the clean signal are kept
    with result.detox.attach(planted.model):
        assert planted.accuracy(planted.model, planted.x_test, planted.y_test) >= 0.99
        assert _asr(planted, planted.model) <= 0.02
    assert _asr(planted, planted.model) == 1.0  # hooks removed: the backdoor is back


def test_variance_form_leaves_the_dormant_channel_in_place(planted):
    """The literal 'reduce the feature variance' reading has no reason to mask a channel that
    does not vary on clean data: the planted backdoor survives (why 'dormant' is the default)."""
    result = detoxify(planted.model, planted.x, planted.y, paths=["stage"], granularity="channel",
                      objective=DetoxObjective(form="variance"), epochs=15, batch_size=64, lr=0.1)
    assert result.detox.channel_masks()["stage"][planted.trigger_channel] < 0.5
    with result.detox.attach(planted.model):
        assert _asr(planted, planted.model) >= 0.9


def test_detox_lowers_the_asr_of_a_trained_backdoor(backdoored_tinynet):
    ns = backdoored_tinynet
    nt = ns.test.labels != 0
    triggered, target = ns.trigger(ns.test.images[nt]), torch.zeros(int(nt.sum()), dtype=torch.long)
    ca0, asr0 = ns.accuracy(ns.model, ns.test.images, ns.test.labels), ns.accuracy(ns.model, triggered, target)
    assert ca0 >= 0.95 and asr0 >= 0.9
    clean = torch.randperm(len(ns.train), generator=torch.Generator().manual_seed(0))[:256]
    result = detoxify(ns.model, ns.train.images[clean], ns.train.labels[clean], paths=["bn1", "bn2"],
                      epochs=20, batch_size=64, lr=0.1)
    with result.detox.attach(ns.model):
        ca, asr = ns.accuracy(ns.model, ns.test.images, ns.test.labels), ns.accuracy(ns.model, triggered, target)
    assert ca >= ca0 - 0.03
    assert asr <= 0.1 * asr0


def test_library_defaults_match_the_robustkd_job_defaults():
    """`detoxify()` and `DetoxObjective()` called bare give what `kdguard robustkd` runs."""
    import inspect

    from kdguard.defenses.robustkd import DetoxConfig

    cfg = DetoxConfig()
    assert cfg.objective() == DetoxObjective()
    params = inspect.signature(detoxify).parameters
    for name in ("granularity", "combine", "init_mask", "activation", "epochs", "batch_size", "lr",
                 "replacement_lr", "learn_replacement", "binarize"):
        assert params[name].default == getattr(cfg, name), name


def test_objective_reads_the_granularity_from_the_mask_shape():
    stats = {"a": _stats([1.0, 3.0])}
    y = torch.zeros(2, dtype=torch.long)
    channel = DetoxObjective()(torch.randn(2, 3), torch.randn(2, 3), y, {"a": torch.ones(2, 1, 1)}, stats)
    explicit = DetoxObjective()(torch.randn(2, 3), torch.randn(2, 3), y, {"a": torch.ones(2, 1, 1)}, stats,
                                granularity="channel")
    torch.testing.assert_close(channel["variance"], explicit["variance"])


def _active_asr(ns, model) -> float:
    x = ns.x_test[ns.y_test != 0]
    return ns.accuracy(model, ns.trigger(x), torch.zeros(len(x), dtype=torch.long))


def test_dormant_form_misses_a_backdoor_on_an_active_channel(active_planted):
    """The learned-blend case of docs/robustkd.md in miniature: no unit is dormant on clean data,
    so the default objective has nothing to cut and the backdoor survives."""
    ns = active_planted
    result = detoxify(ns.model, ns.x, ns.y, paths=["stage"], granularity="channel", epochs=15, batch_size=64, lr=0.1)
    with result.detox.attach(ns.model):
        assert _active_asr(ns, ns.model) >= 0.5


def test_adversarial_term_removes_a_backdoor_on_an_active_channel(active_planted):
    ns = active_planted
    obj = DetoxObjective(adversarial_weight=1.0, epsilon=0.2, adversarial_step=0.02)
    result = detoxify(ns.model, ns.x, ns.y, paths=["stage"], granularity="channel", objective=obj, epochs=15,
                      batch_size=64, lr=0.1)
    delta = result.perturbation
    assert delta.shape == (1, 1, 8, 8) and float(delta.abs().max()) <= 0.2 + 1e-6
    mask = result.detox.channel_masks()["stage"].flatten()
    assert mask[ns.trigger_channel] > 3 * max(mask[0], mask[3])  # the hijacked channel, not its clean twins
    with result.detox.attach(ns.model):
        assert ns.accuracy(ns.model, ns.x_test, ns.y_test) >= 0.99
        assert _active_asr(ns, ns.model) <= 0.05
    assert _active_asr(ns, ns.model) == 1.0  # hooks removed: the backdoor is back


def test_adversarial_detox_is_reproducible_and_off_by_default(planted):
    kw = dict(paths=["stage"], granularity="channel", epochs=2, batch_size=64, lr=0.1)
    obj = DetoxObjective(adversarial_weight=1.0)
    a = detoxify(planted.model, planted.x, planted.y, objective=obj, seed=3, **kw)
    b = detoxify(planted.model, planted.x, planted.y, objective=obj, seed=3, **kw)
    assert torch.equal(a.perturbation, b.perturbation)
    assert torch.equal(a.detox.masks()["stage"], b.detox.masks()["stage"])
    assert "adversarial" in a.history[-1]
    plain = detoxify(planted.model, planted.x, planted.y, seed=3, **kw)
    assert plain.perturbation is None and "adversarial" not in plain.history[-1]


def test_fixed_perturbation_from_the_teacher_removes_a_backdoor_on_an_active_channel(active_planted):
    """adversarial_against="teacher": δ* is searched on the original teacher, then the masks defuse it."""
    ns = active_planted
    # 4 steps a pass here: 10 passes give δ* the ~40 signed steps it needs to converge (with 3 passes
    # it stops half-way and the masks, fitted to a half-formed δ*, cost 21 CA points)
    obj = DetoxObjective(adversarial_weight=1.0, adversarial_against="teacher", perturbation_epochs=10)
    result = detoxify(ns.model, ns.x, ns.y, paths=["stage"], granularity="channel", objective=obj, epochs=15,
                      batch_size=64, lr=0.1)
    assert len(result.perturbation_history) == 10
    assert result.perturbation_history[-1] > result.perturbation_history[0]  # the ascent found a direction
    assert float(result.perturbation.abs().max()) <= 0.2 + 1e-6
    with result.detox.attach(ns.model):
        assert ns.accuracy(ns.model, ns.x_test, ns.y_test) >= 0.99
        assert _active_asr(ns, ns.model) <= 0.05


def test_fixed_perturbation_does_not_move_while_the_masks_learn(planted):
    kw = dict(paths=["stage"], granularity="channel", batch_size=64, lr=0.1, seed=1)
    fixed = DetoxObjective(adversarial_weight=1.0, adversarial_against="teacher", perturbation_epochs=1)
    short = detoxify(planted.model, planted.x, planted.y, objective=fixed, epochs=1, **kw)
    long = detoxify(planted.model, planted.x, planted.y, objective=fixed, epochs=3, **kw)
    assert torch.equal(short.perturbation, long.perturbation)
    assert not torch.equal(short.detox.masks()["stage"], long.detox.masks()["stage"])  # the masks did learn
    minmax = DetoxObjective(adversarial_weight=1.0)
    a = detoxify(planted.model, planted.x, planted.y, objective=minmax, epochs=1, **kw)
    b = detoxify(planted.model, planted.x, planted.y, objective=minmax, epochs=3, **kw)
    assert not torch.equal(a.perturbation, b.perturbation) and a.perturbation_history == []


@pytest.mark.parametrize("kw, words", [
    ({"adversarial_against": "student"}, "adversarial_against"),
    ({"perturbation_epochs": 0}, "perturbation_epochs"),
    ({"perturbation_epochs": 1.5}, "perturbation_epochs"),
])
def test_fixed_perturbation_settings_are_checked(kw, words):
    with pytest.raises(KDGuardError, match=words):
        DetoxObjective(adversarial_weight=1.0, **kw)
