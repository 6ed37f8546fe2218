"""What WarmFed's phases send and keep: the one-shot uploads, the synthesis work items and their
results, the synthetic-set check and its verdicts, and the server state that is checkpointed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from algorithms.base import Broadcast, ServerState


@dataclass
class ClientUploadBundle:
    """What a client sends once: its LoRA (None in the no-personalization ablation) and class counts.

    `key` names the upload's content (see `WarmFed._lora_key`) for reuse between variants; it is
    simulator bookkeeping, not counted as sent."""

    lora: Any
    class_counts: np.ndarray
    key: str = ""
    reused: bool = False

    @property
    def nbytes(self) -> int:
        return (self.lora.num_bytes if self.lora is not None else 0) + int(self.class_counts.nbytes)


@dataclass(frozen=True)
class SynthesisJob:
    """One client's synthesis: the server's input to a pool actor (the upload it holds, a seed)."""

    client_id: int
    lora: Any
    want: np.ndarray
    seed: int
    key: str


@dataclass
class SynthesisResult:
    client_id: int
    images: np.ndarray
    labels: np.ndarray
    seconds: float  # sampling time (0 when reused)
    reused: bool


@dataclass(frozen=True)
class SyntheticCheck(Broadcast):
    """The one-shot personalization's message when clients check the synthetic set: the warm
    start, plus the samples the server drew from this client's own LoRA (no one else's)."""

    images: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))


@dataclass(frozen=True)
class SampleVerdicts:
    """A client's answer to a SyntheticCheck: which of its samples its personalized model labels as asked."""

    client_id: int
    keep: np.ndarray  # bool, in the order the samples came

    @property
    def nbytes(self) -> int:
        return (len(self.keep) + 7) // 8  # one bit per sample on the wire


@dataclass(frozen=True)
class WarmFedServerState(ServerState):
    """WarmFed's server state (checkpointed whole): the global weights; the clients' uploads, which
    the lora phase hands to the synthesis phase; the synthetic union, which the synthesis phase
    hands to the server fine-tuning and the rounds; and how many rounds were aggregated (each
    round's fine-tune draws its own seed from it)."""

    uploads: list[ClientUploadBundle] | None = None
    synthetic_x: np.ndarray | None = None
    synthetic_y: np.ndarray | None = None
    synthetic_owner: np.ndarray | None = None  # the client whose LoRA drew each synthetic sample
    rounds_done: int = 0

    @property
    def has_synthetic(self) -> bool:
        return self.synthetic_y is not None and len(self.synthetic_y) > 0
