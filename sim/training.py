"""The one local-training loop every algorithm uses.

Methods differ in their loss (FedProx's proximal term, MOON's contrastive term, WarmFed's
distillation) or in a step hook (SCAFFOLD's correction), never in the loop itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.sgd import sgd

from sim.config import TrainConfig
from sim.models import Classifier

LossFn = Callable[[Classifier, torch.Tensor, torch.Tensor], torch.Tensor]


class TrainingContext(Protocol):
    """What the loop needs of a client, so this floor module need not know the algorithm API's ClientContext."""

    @property
    def train_cfg(self) -> TrainConfig: ...

    def batches(
        self, split: str = ..., *, purpose: str = ..., epoch: int = ...
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


class SGD:
    """torch's SGD arithmetic (its functional `torch.optim.sgd.sgd`) without the `torch.optim.SGD` object.

    Building any `torch.optim.Optimizer` imports torch's compiler stack (`torch._dynamo`: about 1 s of
    CPU and 70 MB in every process that trains), and each of its steps passes dynamo's graph-break
    wrappers; a client actor running thousands of tiny local updates needs none of that. Calling
    the same functional step as `torch.optim.SGD.step` gives the same bits (tests/test_training.py).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> None:
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._momentum_buffers: dict[int, torch.Tensor] = {}  # by position in `params`, like torch's state

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One step over the parameters that received a gradient (torch.optim.SGD skips the others too)."""
        positions = [i for i, p in enumerate(self.params) if p.grad is not None]
        buffers: list[torch.Tensor | None] = [self._momentum_buffers.get(i) for i in positions]
        sgd(
            [self.params[i] for i in positions],
            [self.params[i].grad for i in positions],  # type: ignore[misc]  # filtered above
            buffers,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        if self.momentum != 0:
            for i, buffer in zip(positions, buffers, strict=True):
                if buffer is not None:
                    self._momentum_buffers[i] = buffer


def local_sgd(
    ctx: TrainingContext,
    model: Classifier,
    *,
    loss_fn: LossFn = cross_entropy,
    epochs: int | None = None,
    lr: float | None = None,
    params: Iterable[torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    split: str = "train",
    purpose: str = "train",
    max_steps: int | None = None,
) -> dict[str, float]:
    """Train `model` on the client's split for `epochs` (default: train.local_epochs); returns loss and steps."""
    cfg = ctx.train_cfg
    model.train()
    trainable = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = SGD(trainable, lr=lr if lr is not None else cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # The loss is summed where it is computed and read once at the end: reading it every step
    # would wait for the GPU every step. float64 sums the float32 losses exactly as Python floats did.
    device = next(iter(trainable)).device if trainable else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    steps = 0
    for epoch in range(epochs if epochs is not None else cfg.local_epochs):
        for x, y in ctx.batches(split, purpose=purpose, epoch=epoch):
            if x.shape[0] < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                continue  # BatchNorm cannot train on a single sample
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += loss.detach().to(torch.float64)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    return {"train_loss": float(total) / max(steps, 1), "train_steps": float(steps)}


Score = tuple[float, float, int]  # (accuracy, mean loss, n)


@torch.no_grad()
def evaluate_segments(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lengths: list[int], batch_size: int = 512
) -> list[Score]:
    """Scores of consecutive segments of (x, y), in full batches across segment borders.

    Evaluating many small splits (every client's val and test under the one global model) one
    forward pass per split spends most of its time on per-call overhead; one pass over their
    concatenation does the same arithmetic in a few large batches. In eval mode every sample's
    logits are independent of its batch-mates, so the scores equal those of separate passes up
    to float rounding; batch borders depend only on the inputs, so they are reproducible.
    """
    n_total = int(y.shape[0])
    device = next(model.parameters()).device
    # Scores stay on the model's device until every batch is done: one copy back, no per-batch wait.
    correct = torch.zeros(n_total, dtype=torch.bool, device=device)
    losses = torch.zeros(n_total, dtype=torch.float64, device=device)
    if n_total:
        model.eval()
        x, y = x.to(device), y.to(device)
        for start in range(0, n_total, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = model(xb)
            losses[start : start + len(yb)] = F.cross_entropy(logits, yb, reduction="none").double()
            correct[start : start + len(yb)] = logits.argmax(1) == yb
    correct, losses = correct.cpu(), losses.cpu()
    scores: list[Score] = []
    offset = 0
    for n in lengths:
        if n == 0:
            scores.append((float("nan"), float("nan"), 0))
        else:
            seg = slice(offset, offset + n)
            scores.append((int(correct[seg].sum()) / n, float(losses[seg].sum()) / n, n))
        offset += n
    return scores


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> Score:
    """(accuracy, mean loss, n) of `model` on one client's split."""
    return evaluate_segments(model, x, y, [int(y.shape[0])], batch_size)[0]
