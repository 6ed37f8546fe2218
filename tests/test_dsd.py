"""DSD's loss against a hand-computed case, and its schedule and selection rules."""

from __future__ import annotations

import math

import pytest
import torch

from algorithms.warmfed.dsd import DSDConfig, dsd_loss, dsd_weight


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
    assert float(dsd_loss(s, t, y, DSDConfig(), 0.0)) == pytest.approx(float(torch.nn.functional.cross_entropy(s, y)))


def test_schedules():
    lin = DSDConfig(lambda0=2.0, schedule="linear")
    assert dsd_weight(lin, 0, 11) == 2.0 and dsd_weight(lin, 10, 11) == 0.0
    assert dsd_weight(lin, 5, 11) == pytest.approx(1.0)
    cos = DSDConfig(lambda0=2.0, schedule="cosine")
    assert dsd_weight(cos, 0, 11) == pytest.approx(2.0) and dsd_weight(cos, 10, 11) == pytest.approx(0.0)
    assert dsd_weight(DSDConfig(lambda0=0.3, schedule="constant"), 7, 11) == 0.3


@pytest.mark.parametrize("kwargs", [{"tau": 0}, {"lambda0": -1}, {"schedule": "step"}, {"selection": "best"}])
def test_bad_dsd_config(kwargs):
    with pytest.raises(ValueError):
        DSDConfig(**kwargs)
