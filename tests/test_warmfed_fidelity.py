"""The fidelity metric on hand-made data whose class (a bright quadrant) and domain (the colour
channel carrying it) any judge can read: a generator that copies the process scores 1, one
that draws the wrong class or domain scores 0."""

from __future__ import annotations

import numpy as np
import pytest

from algorithms.warmfed.fidelity import FidelityJudges, JudgeConfig, fidelity_report

CLASSES, DOMAINS = 4, 3


def _make(labels: np.ndarray, domains: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(-0.8, 0.05, (len(labels), 3, 8, 8)).astype(np.float32)
    for i, (c, d) in enumerate(zip(labels, domains, strict=True)):
        r, q = divmod(int(c), 2)
        x[i, int(d), 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] = 0.8
    return np.clip(x, -1, 1)


def _real(n: int = 480, seed: int = 0):
    y = np.arange(n) % CLASSES
    d = (np.arange(n) // CLASSES) % DOMAINS
    return _make(y, d, seed), y, d


@pytest.fixture(scope="module", params=["cnn", "logreg"])
def judges(request) -> FidelityJudges:
    x, y, d = _real()
    return FidelityJudges(x, y, d, JudgeConfig(kind=request.param, epochs=4, shift=0))


def test_perfect_generator_scores_one_and_wrong_class_zero(judges):
    assert judges.judge_class_accuracy == 1.0 and judges.judge_domain_accuracy == 1.0
    y = np.arange(120) % CLASSES
    d = np.arange(120) % DOMAINS
    clients = d.copy()  # one client per domain
    good = judges.report(_make(y, d, seed=5), y, d, synth_client=clients, domain_names=("r", "g", "b"))
    assert good["class_fidelity"] == 1.0 and good["domain_fidelity"] == 1.0
    assert set(good["per_domain"]) == {"r", "g", "b"} and all(v["n"] == 40 for v in good["per_domain"].values())
    assert good["per_client"][1]["domain"] == "g" and good["per_client"][1]["class_fidelity"] == 1.0
    wrong_class = judges.report(_make((y + 1) % CLASSES, d, seed=6), y, d)
    assert wrong_class["class_fidelity"] == 0.0 and wrong_class["domain_fidelity"] == 1.0
    # a base backbone that always draws domain 0: right for one client in three
    base = judges.report(_make(y, np.zeros_like(d), seed=7), y, d)
    assert base["domain_fidelity"] == pytest.approx(1 / 3, abs=0.01) and base["predicted_domains"] == {"0": 120}
    assert base["chance_domain"] == pytest.approx(1 / 3) and base["chance_class"] == 0.25


def test_fidelity_report_is_seeded_and_checks_its_input():
    x, y, d = _real(240)
    sy = np.arange(40) % CLASSES
    sd = np.arange(40) % DOMAINS
    sx = _make(sy, sd, 3) + np.random.default_rng(1).normal(0, 0.6, (40, 3, 8, 8)).astype(np.float32)
    a = fidelity_report(x, y, d, sx, sy, sd, cfg=JudgeConfig(epochs=2))
    b = fidelity_report(x, y, d, sx, sy, sd, cfg=JudgeConfig(epochs=2))
    assert a == b
    with pytest.raises(ValueError, match="one label per image"):
        fidelity_report(x, y[:-1], d, sx, sy, sd)
    with pytest.raises(ValueError, match="synthetic domains must be in"):
        fidelity_report(x, y, d, sx, sy, sd + 5, cfg=JudgeConfig(epochs=1))
    with pytest.raises(ValueError, match="judge kind"):
        JudgeConfig(kind="svm")


def _public(labels: np.ndarray, seed: int) -> np.ndarray:
    """The backbone's public look: the class quadrant bright in every channel (grey)."""
    x = _make(labels, np.zeros_like(labels), seed)
    x[:, 1:] = x[:, :1]
    return x


@pytest.mark.parametrize("kind", ["cnn", "logreg"])
def test_public_look_is_no_client_domain(kind):
    x, y, d = _real()
    py = np.arange(120) % CLASSES
    judges = FidelityJudges(x, y, d, JudgeConfig(kind=kind, epochs=4, shift=0), public_x=_public(py, 9))
    sd = np.arange(120) % DOMAINS
    unadapted = judges.report(_public(py, 10), py, sd)
    assert unadapted["predicted_domains"] == {"public": 120} and unadapted["domain_fidelity"] == 0.0
    assert unadapted["class_fidelity"] == 1.0 and unadapted["chance_domain"] == pytest.approx(1 / 4)
    adapted = judges.report(_make(py, sd, seed=11), py, sd)
    assert adapted["domain_fidelity"] == 1.0 and "public" not in adapted["predicted_domains"]
    with pytest.raises(ValueError, match="public images must have shape"):
        FidelityJudges(x, y, d, JudgeConfig(kind=kind, epochs=1), public_x=np.zeros((4, 3, 4, 4), np.float32))
