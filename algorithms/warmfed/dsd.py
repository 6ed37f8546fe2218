"""Dynamic self-distillation (DSD): how a WarmFed client turns the newest global model into its own.

    L = CE(s(x), y) + w_c · λ_t · τ² · mean_i[ m_i · KL(softmax(t(x_i)/τ) ‖ softmax(s(x_i)/τ)) ]

*Self*-distillation as in pFedSD (Jin et al., "Personalized Edge Intelligence via Federated
Self-Knowledge Distillation", IEEE TPDS 2023): the teacher t is the client's own previous
personalized model (the warm start for the first one), the student s starts from the newest
global model and trains on the client's real data, so a client keeps what it learned about its
own distribution while taking in what the federation learned since.

"Dynamic" is the weighting, which we take from FedSSD (He et al., "Learning Critically:
Selective Self-Distillation in Federated Learning on Non-IID Data", IEEE Trans. Big Data 2022):
distil more where the teacher is credible.

* per sample, m_i: the teacher's probability of the true label (``selection="credibility"``,
  FedSSD's sample-level credibility), or a hard mask (teacher right / confident), or 1;
* per client and round, w_c: how much the teacher beats the new global model on the client's
  validation split (``client_weighting="advantage"``): 1 at parity, 0 when the teacher is
  ``margin`` worse (stale knowledge is not distilled), 2 when it is ``margin`` better;
* per step, λ_t: a schedule over the local steps (decaying: the own past anchors the start,
  the client's data has the last word).

How the two terms combine (``combine``): ``"additive"`` is the formula above; ``"convex"`` takes
α = w_c·λ_t / (1 + w_c·λ_t) and minimises (1 − α)·CE + α·τ²·mean_i[m_i·KL], Hinton et al.'s
weighting ("Distilling the Knowledge in a Neural Network", 2015), so the gradient keeps the scale
of plain fine-tuning and DSD at a rate takes steps of the size plain CE takes at that rate (the
additive sum can reach three times the CE term's weight, and at the fine-tuning baselines' rate
its first round diverged on the mechanism benchmark).

Teacher and student run in the same normalization mode (``teacher_mode="batch"``: both use
batch statistics, as the training student does), so the KL is exactly zero at identical
weights; ``"running"`` runs the teacher in eval mode instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("constant", "linear", "cosine")
SELECTIONS = ("all", "correct", "confidence", "credibility")
CLIENT_WEIGHTINGS = ("none", "advantage")
TEACHER_MODES = ("batch", "running")
COMBINATIONS = ("additive", "convex")


@dataclass(frozen=True)
class DSDConfig:
    tau: float = 2.0
    lambda0: float = 1.0
    schedule: str = "linear"  # constant | linear | cosine decay of λ over the local steps
    # all | correct (teacher right) | confidence (teacher max prob ≥ threshold) | credibility (teacher's p(true label))
    selection: str = "credibility"
    threshold: float = 0.5
    client_weighting: str = "advantage"  # none | advantage (teacher vs new global on the client's val split)
    margin: float = 0.1  # accuracy gap at which the client weight reaches 0 (teacher worse) or 2 (better)
    teacher_mode: str = "batch"  # batch: BatchNorm on batch statistics, as the student | running: eval mode
    combine: str = "additive"  # additive: CE + weight·KL | convex: (1 − α)·CE + α·KL, α = weight / (1 + weight)

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"dsd tau must be > 0, got {self.tau}")
        if self.lambda0 < 0:
            raise ValueError(f"dsd lambda0 must be >= 0, got {self.lambda0}")
        if self.margin <= 0:
            raise ValueError(f"dsd margin must be > 0, got {self.margin}")
        for field, value, allowed in (
            ("schedule", self.schedule, SCHEDULES),
            ("selection", self.selection, SELECTIONS),
            ("client_weighting", self.client_weighting, CLIENT_WEIGHTINGS),
            ("teacher_mode", self.teacher_mode, TEACHER_MODES),
            ("combine", self.combine, COMBINATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"dsd {field} must be one of {', '.join(allowed)}, got {value!r}")


def dsd_weight(cfg: DSDConfig, step: int, total_steps: int) -> float:
    """λ_t at local step `step` of `total_steps`."""
    if cfg.schedule == "constant" or total_steps <= 1:
        return cfg.lambda0
    progress = min(1.0, step / (total_steps - 1))
    if cfg.schedule == "linear":
        return cfg.lambda0 * (1.0 - progress)
    return cfg.lambda0 * 0.5 * (1.0 + math.cos(math.pi * progress))


def client_weight(cfg: DSDConfig, teacher_acc: float, global_acc: float) -> float:
    """w_c from the teacher's and the new global model's accuracy on the client's validation split."""
    if cfg.client_weighting == "none" or math.isnan(teacher_acc) or math.isnan(global_acc):
        return 1.0  # no validation data: no evidence either way
    return min(2.0, max(0.0, 1.0 + (teacher_acc - global_acc) / cfg.margin))


def teacher_mask(cfg: DSDConfig, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """m_i: how much each sample's teacher output is trusted."""
    if cfg.selection == "all":
        return torch.ones_like(y, dtype=teacher_logits.dtype)
    if cfg.selection == "correct":
        return (teacher_logits.argmax(1) == y).to(teacher_logits.dtype)
    probs = teacher_logits.softmax(1)
    if cfg.selection == "credibility":
        return probs.gather(1, y[:, None]).squeeze(1)
    return (probs.max(1).values >= cfg.threshold).to(teacher_logits.dtype)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(teacher ‖ student) per sample at temperature τ."""
    log_s = F.log_softmax(student_logits / tau, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / tau, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1)


def dsd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, cfg: DSDConfig, lam: float
) -> torch.Tensor:
    """The DSD objective for one batch (averaged over the batch; `lam` already holds w_c · λ_t)."""
    ce = F.cross_entropy(student_logits, y)
    if lam == 0:
        return ce
    kl = distillation_kl(student_logits, teacher_logits, cfg.tau)
    mask = teacher_mask(cfg, teacher_logits.detach(), y)
    distill = cfg.tau * cfg.tau * (mask * kl).mean()
    if cfg.combine == "convex":
        alpha = lam / (1.0 + lam)
        return (1.0 - alpha) * ce + alpha * distill
    return ce + lam * distill


class LogitEnsemble(nn.Module):
    """Two teachers as one: the mean of their logits (FedDF's ensemble, Lin et al., "Ensemble
    Distillation for Robust Model Fusion in Federated Learning", NeurIPS 2020).

    ``dsd_teacher: both`` distils from the client's previous personalized model and the newest
    global model together, the two-teacher reading of FedCKD that ../shared/WARMFED.md lists: the
    client's own past where it was right, the federation's newer knowledge where it was not.
    Averaging logits (not probabilities) keeps the target a softmax of logits at every τ, so the
    selection masks and the KL read it as they read one teacher."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.first(x) + self.second(x))


class DSDObjective:
    """A loss callback for the shared training loop: steps the λ schedule and runs the frozen teacher.

    `lambdas` keeps the weight used at every step (w_c · λ_t) and `kls` the batch's mean KL, so a
    run can show that the schedule advanced and what was distilled."""

    def __init__(self, teacher: nn.Module, cfg: DSDConfig, total_steps: int, client_weight: float = 1.0) -> None:
        self.teacher = teacher
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.total_steps = total_steps
        self.client_weight = client_weight
        self.step = 0
        self.lambdas: list[float] = []
        self.kls: list[float] = []

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.train(self.cfg.teacher_mode == "batch")
        with torch.no_grad():
            return self.teacher(x)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        teacher_logits = self.teacher_logits(x)
        lam = self.client_weight * dsd_weight(self.cfg, self.step, self.total_steps)
        self.step += 1
        student_logits = model(x)
        self.lambdas.append(lam)
        self.kls.append(float(distillation_kl(student_logits.detach(), teacher_logits, self.cfg.tau).mean()))
        return dsd_loss(student_logits, teacher_logits, y, self.cfg, lam)
