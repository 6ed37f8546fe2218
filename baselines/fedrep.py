"""FedRep (Collins et al., ICML 2021): shared representation, personal head, trained in two phases.

Each round a client first fits its personal head with the received body frozen (`head_epochs`),
then updates the body with its new head frozen (`body_epochs`); only the body is averaged
(paper, Algorithm 1). The paper uses 10 head epochs per body epoch. Scaled to our setting: the
body gets the shared budget `train.local_epochs` (default 1, the paper's body epoch), and the head
1 epoch: at a large step (lr 0.05 with momentum 0.9, an effective step of ≈0.5) ten head passes
overfit the head to the current body so hard that the following body epoch diverges.
`head_epochs=10` gives the paper's ratio; the tuner searches head_epochs ∈ {1, 5}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from algorithms.base import ClientContext, ClientUpdate, PersonalState, model_weights
from algorithms.registry import register
from baselines.common import InitBroadcast, PartialSharing, trainable_only
from sim.metrics import declare_metric
from sim.training import local_sgd

declare_metric("head_loss", higher_is_better=False, description="FedRep: mean batch loss of the head epochs")


@dataclass(frozen=True)
class FedRepParams:
    head_epochs: int = 1
    body_epochs: int | None = None  # None: train.local_epochs

    def __post_init__(self) -> None:
        if self.head_epochs < 0:
            raise ValueError(f"head_epochs must be >= 0, got {self.head_epochs}")
        if self.body_epochs is not None and self.body_epochs < 0:
            raise ValueError(f"body_epochs must be >= 0 (or null for train.local_epochs), got {self.body_epochs}")


@register("fedrep")
class FedRep(PartialSharing):
    Params = FedRepParams
    search_space: ClassVar[dict[str, tuple[Any, ...]]] = {"head_epochs": (1, 5)}
    personal_patterns = ("head.*",)

    def local_train(
        self, ctx: ClientContext, message: InitBroadcast, client_state: PersonalState | None
    ) -> tuple[ClientUpdate, PersonalState | None]:
        ctx.load_model(self.start_weights(ctx, message, client_state))
        with trainable_only(ctx.model, self.is_personal):
            head = local_sgd(ctx, ctx.model, epochs=self.params.head_epochs, purpose="fedrep/head")
        with trainable_only(ctx.model, lambda name: not self.is_personal(name)):
            body = local_sgd(ctx, ctx.model, epochs=self.params.body_epochs, purpose="train")
        trained = model_weights(ctx.model)
        metrics = {**body, "head_loss": head["train_loss"]}
        update = ClientUpdate(ctx.client_id, self.shared_part(trained), ctx.data.size("train"), metrics)
        return update, PersonalState(self.personal_part(trained))
