"""Fidelity of synthetic samples: do they show the class asked and the client's domain?

Two judges are trained on *real* client data only: a class judge (labels -> class) and a
domain judge (domain of every client, one output per domain). A synthetic sample is
class-faithful if the class judge gives it the class it was sampled for, and
domain-faithful if the domain judge gives it the domain of the client whose LoRA made it.
Base-backbone samples scored with the same judges show what the LoRA adds.

Judges are tiny CNNs trained with the project's one training loop (``local_sgd``), seeded,
with ±1-pixel shifts (a generator's digits are not pixel-aligned with the real ones); a
pixel logistic regression (``kind="logreg"``) is there as a cross-check. Each report also
gives the judges' accuracy on held-out real images: the ceiling a perfect generator reaches.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sim.config import TrainConfig
from sim.models import Classifier
from sim.rng import stream_rng

__all__ = ["JudgeConfig", "FidelityJudges", "fidelity_report"]

JUDGE_KINDS = ("cnn", "logreg")


@dataclass(frozen=True)
class JudgeConfig:
    kind: str = "cnn"
    epochs: int = 20  # fewer leave the class judge below what real images score with it
    batch_size: int = 64
    lr: float = 0.05
    holdout: float = 0.2  # fraction of the real data kept to measure the judges themselves
    shift: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in JUDGE_KINDS:
            raise ValueError(f"judge kind must be one of {', '.join(JUDGE_KINDS)}, got {self.kind!r}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("judge epochs must be >= 1, batch_size >= 2 and lr > 0")
        if not 0.0 <= self.holdout < 0.9:
            raise ValueError(f"judge holdout must be in [0, 0.9), got {self.holdout}")


def _cnn(in_channels: int, size: int, outputs: int) -> Classifier:
    features = nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    return Classifier(features, 32 * (size // 4) ** 2, outputs)  # the head is built last, as before


class _Batches:
    """The slice of a ClientContext that ``local_sgd`` reads: seeded shuffled batches, shifted."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cfg: JudgeConfig, salt: int) -> None:
        self.x, self.y, self.cfg, self.salt = x, y, cfg, salt
        self.train_cfg = TrainConfig(lr=cfg.lr, momentum=0.9, weight_decay=5e-4, local_epochs=cfg.epochs)

    def batches(
        self, split: str = "train", *, purpose: str = "train", epoch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.salt * 100 + epoch)
        order = torch.randperm(len(self.y), generator=g)
        s = self.cfg.shift
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start : start + self.cfg.batch_size]
            xb = self.x[idx]
            if s > 0:
                dy, dx = torch.randint(-s, s + 1, (2,), generator=g).tolist()
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            yield xb, self.y[idx]


class _Judge:
    def __init__(self, x: np.ndarray, y: np.ndarray, outputs: int, cfg: JudgeConfig, salt: int) -> None:
        self.kind = cfg.kind
        if cfg.kind == "logreg":
            from sklearn.linear_model import LogisticRegression

            self.model: Any = LogisticRegression(C=0.1, max_iter=300).fit(x.reshape(len(x), -1), y)
            return
        from sim.training import local_sgd

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1000 + salt)
            net = _cnn(x.shape[1], x.shape[-1], outputs)
        data = _Batches(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), cfg, salt)
        local_sgd(data, net)
        self.model = net.eval()

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, np.int64)
        if self.kind == "logreg":
            return self.model.predict(np.asarray(x).reshape(len(x), -1)).astype(np.int64)
        out = [
            self.model(torch.from_numpy(np.ascontiguousarray(x[i : i + 1024]))).argmax(1)
            for i in range(0, len(x), 1024)
        ]
        return torch.cat(out).numpy().astype(np.int64)


def _check(x: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64)
    if x.ndim != 4:
        raise ValueError(f"{what} images must be (N, C, H, W), got shape {x.shape}")
    if labels.shape != (x.shape[0],):
        raise ValueError(f"{what}: need one label per image, got {labels.shape} for {x.shape[0]} images")
    return x, labels


class FidelityJudges:
    """Class and domain judges fitted once on real data, then used on any number of synthetic sets."""

    def __init__(
        self,
        real_x: np.ndarray,
        real_y: np.ndarray,
        real_domain: np.ndarray,
        cfg: JudgeConfig = JudgeConfig(),
        *,
        num_classes: int | None = None,
        num_domains: int | None = None,
        public_x: np.ndarray | None = None,
    ) -> None:
        """``public_x``: images of the backbone's public (pretraining) look; the domain judge then
        has one more output for it, so an unadapted sample is not forced onto some client domain."""
        x, y = _check(real_x, real_y, "real")
        _, d = _check(real_x, real_domain, "real (domains)")
        if len(y) < 10:
            raise ValueError(f"need at least 10 real images to fit the fidelity judges, got {len(y)}")
        self.cfg = cfg
        self.num_classes = int(num_classes or y.max() + 1)
        self.num_domains = int(num_domains or d.max() + 1)
        rng = stream_rng(cfg.seed)
        perm = rng.permutation(len(y))
        k = int(round(cfg.holdout * len(y)))
        held, fit = perm[:k], perm[k:]
        self.class_judge = _Judge(x[fit], y[fit], self.num_classes, cfg, salt=1)
        dx, dd = x[fit], d[fit]
        self.has_public = public_x is not None and len(public_x) > 0
        if self.has_public:
            px = np.asarray(public_x, dtype=np.float32)
            if px.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"public images must have shape (N, {', '.join(map(str, x.shape[1:]))}), got {px.shape}"
                )
            dx = np.concatenate([dx, px])
            dd = np.concatenate([dd, np.full(len(px), self.num_domains, np.int64)])
        outputs = self.num_domains + int(self.has_public)
        self.domain_judge = _Judge(dx, dd, outputs, cfg, salt=2) if outputs > 1 else None
        self.judge_class_accuracy = float((self.class_judge.predict(x[held]) == y[held]).mean()) if k else float("nan")
        self.judge_domain_accuracy = (
            float((self.domain_judge.predict(x[held]) == d[held]).mean()) if k and self.domain_judge else float("nan")
        )

    def report(
        self,
        synth_x: np.ndarray,
        synth_y: np.ndarray,
        synth_domain: np.ndarray | Sequence[int],
        *,
        synth_client: np.ndarray | None = None,
        domain_names: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Fidelity of one synthetic set; ``synth_domain`` is the domain each sample should show
        (its client's), ``synth_client`` (optional) groups the rows per client."""
        x, y = _check(synth_x, synth_y, "synthetic")
        _, d = _check(synth_x, synth_domain, "synthetic (domains)")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"synthetic labels must be in [0, {self.num_classes})")
        if len(d) and (d.min() < 0 or d.max() >= self.num_domains):
            raise ValueError(f"synthetic domains must be in [0, {self.num_domains})")
        class_ok = self.class_judge.predict(x) == y
        domain_pred = self.domain_judge.predict(x) if self.domain_judge else np.zeros(len(y), np.int64)
        domain_ok = domain_pred == d

        def summary(mask: np.ndarray) -> dict[str, float]:
            n = int(mask.sum())
            return {
                "n": n,
                "class_fidelity": float(class_ok[mask].mean()) if n else float("nan"),
                "domain_fidelity": float(domain_ok[mask].mean()) if n else float("nan"),
            }

        def name(k: int) -> str:
            if k == self.num_domains and self.has_public:
                return "public"
            return str(domain_names[k]) if domain_names is not None else str(k)

        out: dict[str, Any] = {
            **summary(np.ones(len(y), bool)),
            "chance_class": 1.0 / self.num_classes,
            "chance_domain": 1.0 / (self.num_domains + int(self.has_public)),
            "judge_class_accuracy": self.judge_class_accuracy,
            "judge_domain_accuracy": self.judge_domain_accuracy,
            "judge": self.cfg.kind,
            "per_domain": {name(int(k)): summary(d == k) for k in np.unique(d)},
            # where the domain judge puts the samples (a mode collapse onto one domain shows here)
            "predicted_domains": {name(int(k)): int((domain_pred == k).sum()) for k in np.unique(domain_pred)},
        }
        if synth_client is not None:
            c = np.asarray(synth_client)
            if c.shape != y.shape:
                raise ValueError(f"synth_client must have one entry per sample, got {c.shape} for {len(y)}")
            out["per_client"] = {int(k): {**summary(c == k), "domain": name(int(d[c == k][0]))} for k in np.unique(c)}
        return out


def fidelity_report(
    real_x: np.ndarray,
    real_y: np.ndarray,
    real_domain: np.ndarray,
    synth_x: np.ndarray,
    synth_y: np.ndarray,
    synth_domain: np.ndarray,
    *,
    synth_client: np.ndarray | None = None,
    domain_names: Sequence[str] | None = None,
    cfg: JudgeConfig = JudgeConfig(),
    num_classes: int | None = None,
    num_domains: int | None = None,
) -> dict[str, Any]:
    """Fit the judges on the real data and score one synthetic set (see :class:`FidelityJudges`).

    To score several sets (base beside LoRA) fit :class:`FidelityJudges` once and call
    ``report`` per set: the judges cost more than scoring.
    """
    judges = FidelityJudges(real_x, real_y, real_domain, cfg, num_classes=num_classes, num_domains=num_domains)
    return judges.report(synth_x, synth_y, synth_domain, synth_client=synth_client, domain_names=domain_names)


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of ``{label: report}`` (overall and per domain)."""
    lines = ["| set | domain | n | class fidelity | domain fidelity |", "|---|---|---|---|---|"]
    for label, rep in rows.items():
        for dom, s in rep["per_domain"].items():
            lines.append(f"| {label} | {dom} | {s['n']} | {s['class_fidelity']:.3f} | {s['domain_fidelity']:.3f} |")
        lines.append(
            f"| {label} | **all** | {rep['n']} | **{rep['class_fidelity']:.3f}** | **{rep['domain_fidelity']:.3f}** |"
        )
    return "\n".join(lines)
