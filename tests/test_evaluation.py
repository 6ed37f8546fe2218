"""Batched evaluation gives each client the scores a separate pass would, in reproducible chunks."""

from __future__ import annotations

import math

import numpy as np
import torch

from sim.models import ModelSpec, build_model
from sim.orchestration.engine import eval_chunks
from sim.training import evaluate, evaluate_segments


def test_segments_score_like_separate_passes():
    torch.manual_seed(0)
    model = build_model("small_cnn", ModelSpec(3, 10, 28))
    lengths = [7, 0, 130, 1, 45]
    x = torch.randn(sum(lengths), 3, 28, 28)
    y = torch.randint(0, 10, (sum(lengths),))
    together = evaluate_segments(model, x, y, lengths, batch_size=64)  # batches straddle segment borders
    offset = 0
    for n, (acc, loss, count) in zip(lengths, together, strict=True):
        assert count == n
        if n == 0:
            assert math.isnan(acc) and math.isnan(loss)
        else:
            alone = evaluate(model, x[offset : offset + n], y[offset : offset + n], batch_size=512)
            assert acc == alone[0]
            assert abs(loss - alone[1]) < 1e-5
        offset += n


def test_eval_chunks_cover_every_client_once_and_stay_small():
    for n in (1, 10, 100, 1000, 10_000):
        clients = np.arange(n) * 3
        chunks = eval_chunks(clients)
        assert np.array_equal(np.concatenate(chunks), clients)
        assert max(len(c) for c in chunks) <= 32
        assert len(chunks) >= min(n, 8)  # enough tasks to keep several actors busy
