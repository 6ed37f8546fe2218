"""Dynamic self-distillation (DSD): WarmFed's local objective during the rounds.

    L = CE(s(x), y) + λ_t · τ² · mean_i[ m_i · KL(softmax(t(x_i)/τ) ‖ softmax(s(x_i)/τ)) ]

The teacher t is the model the client received this round (frozen), the student s the
client's model. The distillation is *dynamic* twice over: m_i selects the samples on which
the teacher is reliable (it predicts the true label, or its confidence passes a threshold),
and λ_t follows a schedule over the local steps, so global knowledge anchors the start and
personalization takes over by the end. Our reading of the paper; every choice is a parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("constant", "linear", "cosine")
SELECTIONS = ("all", "correct", "confidence")


@dataclass(frozen=True)
class DSDConfig:
    tau: float = 2.0
    lambda0: float = 1.0
    schedule: str = "linear"  # constant | linear | cosine decay of λ over the local steps
    selection: str = "correct"  # all | correct (teacher right) | confidence (teacher max prob ≥ threshold)
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"dsd tau must be > 0, got {self.tau}")
        if self.lambda0 < 0:
            raise ValueError(f"dsd lambda0 must be >= 0, got {self.lambda0}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"dsd schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"dsd selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")


def dsd_weight(cfg: DSDConfig, step: int, total_steps: int) -> float:
    """λ_t at local step `step` of `total_steps`."""
    if cfg.schedule == "constant" or total_steps <= 1:
        return cfg.lambda0
    progress = min(1.0, step / (total_steps - 1))
    if cfg.schedule == "linear":
        return cfg.lambda0 * (1.0 - progress)
    return cfg.lambda0 * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_mask(cfg: DSDConfig, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if cfg.selection == "all":
        return torch.ones_like(y, dtype=teacher_logits.dtype)
    if cfg.selection == "correct":
        return (teacher_logits.argmax(1) == y).to(teacher_logits.dtype)
    return (teacher_logits.softmax(1).max(1).values >= cfg.threshold).to(teacher_logits.dtype)


def dsd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, cfg: DSDConfig, lam: float
) -> torch.Tensor:
    """The DSD objective for one batch (averaged over the batch, masked samples count as zero)."""
    ce = F.cross_entropy(student_logits, y)
    if lam == 0:
        return ce
    tau = cfg.tau
    log_s = F.log_softmax(student_logits / tau, dim=1)
    log_t = F.log_softmax(teacher_logits.detach() / tau, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)  # KL(teacher ‖ student) per sample
    mask = teacher_mask(cfg, teacher_logits.detach(), y)
    return ce + lam * tau * tau * (mask * kl).mean()


class DSDObjective:
    """A loss callback for the shared training loop: tracks the step to drive the λ schedule."""

    def __init__(self, teacher: nn.Module, cfg: DSDConfig, total_steps: int) -> None:
        self.teacher = teacher.eval()
        self.cfg = cfg
        self.total_steps = total_steps
        self.step = 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        lam = dsd_weight(self.cfg, self.step, self.total_steps)
        self.step += 1
        return dsd_loss(model(x), teacher_logits, y, self.cfg, lam)
