"""DSD's loss against a hand-computed case, and its schedule and selection rules."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.warmfed.dsd import DSDConfig, client_weight, dsd_loss, dsd_weight, teacher_mask


def _hand_kl(t_logits, s_logits, tau):
    def softmax(v):
        e = [math.exp(a / tau) for a in v]
        z = sum(e)
        return [a / z for a in e]

    p, q = softmax(t_logits), softmax(s_logits)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _hand_ce(logits, y):
    z = sum(math.exp(a) for a in logits)
    return -math.log(math.exp(logits[y]) / z)


def test_dsd_loss_matches_hand_computation():
    student = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    teacher = [[1.5, 1.0, -0.5], [2.0, -1.0, 0.0]]
    y = [0, 2]  # teacher right on sample 0, wrong on sample 1
    tau, lam = 2.0, 0.7
    cfg = DSDConfig(tau=tau, lambda0=lam, selection="correct")
    got = dsd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(y), cfg, lam)
    ce = (_hand_ce(student[0], 0) + _hand_ce(student[1], 2)) / 2
    kl0 = _hand_kl(teacher[0], student[0], tau)  # sample 1 masked out: teacher predicts class 0, label is 2
    expected = ce + lam * tau**2 * (kl0 + 0.0) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)

    all_cfg = DSDConfig(tau=tau, lambda0=lam, selection="all")
    got_all = dsd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(y), all_cfg, lam)
    kl1 = _hand_kl(teacher[1], student[1], tau)
    assert float(got_all) == pytest.approx(ce + lam * tau**2 * (kl0 + kl1) / 2, rel=1e-6)

    conf_cfg = DSDConfig(tau=tau, lambda0=lam, selection="confidence", threshold=0.9)
    # teacher max prob: sample 0 ≈ 0.57, sample 1 ≈ 0.84 — both below 0.9, so plain CE remains
    got_conf = dsd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(y), conf_cfg, lam)
    assert float(got_conf) == pytest.approx(ce, rel=1e-6)


def test_dsd_with_zero_weight_is_cross_entropy():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    ce = float(torch.nn.functional.cross_entropy(s, y))
    for combine in ("additive", "convex"):
        assert float(dsd_loss(s, t, y, DSDConfig(combine=combine), 0.0)) == pytest.approx(ce)


def test_convex_dsd_weights_ce_and_distillation_to_one():
    """(1 − α)·CE + α·τ²·KL with α = w / (1 + w): the additive loss divided by 1 + w, so its
    gradient keeps plain CE's scale whatever the weight."""
    student = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    teacher = [[1.5, 1.0, -0.5], [2.0, -1.0, 0.0]]
    y, tau, lam = [0, 2], 2.0, 1.5
    cfg = DSDConfig(tau=tau, selection="all", combine="convex")
    got = dsd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(y), cfg, lam)
    ce = (_hand_ce(student[0], 0) + _hand_ce(student[1], 2)) / 2
    kl = (_hand_kl(teacher[0], student[0], tau) + _hand_kl(teacher[1], student[1], tau)) / 2
    alpha = lam / (1 + lam)
    assert float(got) == pytest.approx((1 - alpha) * ce + alpha * tau**2 * kl, rel=1e-6)
    additive = dsd_loss(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(y), DSDConfig(tau=tau, selection="all"), lam
    )
    assert float(got) == pytest.approx(float(additive) / (1 + lam), rel=1e-6)


def test_schedules():
    lin = DSDConfig(lambda0=2.0, schedule="linear")
    assert dsd_weight(lin, 0, 11) == 2.0 and dsd_weight(lin, 10, 11) == 0.0
    assert dsd_weight(lin, 5, 11) == pytest.approx(1.0)
    cos = DSDConfig(lambda0=2.0, schedule="cosine")
    assert dsd_weight(cos, 0, 11) == pytest.approx(2.0) and dsd_weight(cos, 10, 11) == pytest.approx(0.0)
    assert dsd_weight(DSDConfig(lambda0=0.3, schedule="constant"), 7, 11) == 0.3


def test_credibility_weighs_each_sample_by_the_teachers_probability_of_its_label():
    """FedSSD's sample credibility, the default: m_i = softmax(teacher)_i[y_i], worked by hand."""
    student = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
    teacher = [[1.5, 1.0, -0.5], [2.0, -1.0, 0.0]]
    y = [0, 2]
    cfg = DSDConfig(tau=2.0, selection="credibility")
    probs = [[math.exp(a) / sum(math.exp(b) for b in row) for a in row] for row in teacher]
    credibility = [probs[0][0], probs[1][2]]
    t = torch.tensor(teacher, dtype=torch.float64)
    mask = teacher_mask(cfg, t, torch.tensor(y))
    assert mask.dtype == torch.float64 and mask.tolist() == pytest.approx(credibility, rel=1e-12)
    # λ = 1 exactly distils too (only λ = 0 is plain cross-entropy)
    got = dsd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(y), cfg, 1.0)
    kls = [_hand_kl(teacher[i], student[i], 2.0) for i in range(2)]
    ce = (_hand_ce(student[0], 0) + _hand_ce(student[1], 2)) / 2
    expected = ce + 1.0 * 4.0 * (credibility[0] * kls[0] + credibility[1] * kls[1]) / 2
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_selection_rules_keep_the_logits_dtype_and_the_confidence_boundary():
    # sample 0: max prob exactly 0.5 (two tied logits, the third far below); sample 1: one-hot teacher
    t = torch.tensor([[0.0, 0.0, -1e9], [0.0, 50.0, -50.0]], dtype=torch.float64)
    y = torch.tensor([1, 1])
    for selection, expected in (("all", [1.0, 1.0]), ("correct", [0.0, 1.0]), ("confidence", [1.0, 1.0])):
        mask = teacher_mask(DSDConfig(selection=selection, threshold=0.5), t, y)
        assert mask.dtype == torch.float64 and mask.tolist() == expected, selection  # threshold itself counts
    assert teacher_mask(DSDConfig(selection="confidence", threshold=0.6), t, y).tolist() == [0.0, 1.0]
    assert teacher_mask(DSDConfig(selection="all", threshold=0.6), t, y).tolist() == [1.0, 1.0]  # no threshold


def test_the_teacher_is_frozen():
    from algorithms.warmfed.dsd import DSDObjective

    teacher = torch.nn.Linear(3, 2)
    DSDObjective(teacher, DSDConfig(), total_steps=4)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_schedule_edges_worked_by_hand():
    lin = DSDConfig(lambda0=2.0, schedule="linear")
    assert [dsd_weight(lin, s, 5) for s in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    assert dsd_weight(lin, 7, 5) == 0.0  # past the last step λ stays at its end, never negative
    assert [dsd_weight(lin, s, 2) for s in range(2)] == [2.0, 0.0]
    assert dsd_weight(lin, 0, 1) == 2.0 and dsd_weight(lin, 0, 0) == 2.0  # one step (or none): λ0
    cos = DSDConfig(lambda0=2.0, schedule="cosine")
    assert [dsd_weight(cos, s, 3) for s in range(3)] == pytest.approx([2.0, 1.0, 0.0], abs=1e-12)


def test_client_weight_is_the_teachers_advantage_clipped_to_0_and_2():
    cfg = DSDConfig(margin=0.1)
    assert client_weight(cfg, 0.85, 0.80) == pytest.approx(1.5)
    assert client_weight(cfg, 0.75, 0.80) == pytest.approx(0.5)
    assert client_weight(cfg, 0.80, 0.80) == 1.0
    assert client_weight(cfg, 1.0, 0.5) == 2.0 and client_weight(cfg, 0.2, 0.9) == 0.0
    assert (
        client_weight(cfg, math.nan, 0.8) == 1.0 and client_weight(DSDConfig(client_weighting="none"), 1.0, 0.0) == 1.0
    )


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tau": 0}, "dsd tau must be > 0, got 0"),
        ({"lambda0": -1}, "dsd lambda0 must be >= 0, got -1"),
        ({"schedule": "step"}, "dsd schedule must be one of constant, linear, cosine, got 'step'"),
        ({"selection": "best"}, "dsd selection must be one of all, correct, confidence, credibility, got 'best'"),
        ({"client_weighting": "x"}, "dsd client_weighting must be one of none, advantage, got 'x'"),
        ({"teacher_mode": "x"}, "dsd teacher_mode must be one of batch, running, got 'x'"),
    ],
)
def test_bad_dsd_config(kwargs, words):
    with pytest.raises(ValueError) as exc:
        DSDConfig(**kwargs)
    assert str(exc.value) == words


def test_small_tau_and_zero_lambda_are_valid():
    assert DSDConfig(tau=0.5, lambda0=0.0).tau == 0.5
