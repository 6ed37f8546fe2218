"""The shared local-training loop's optimizer: torch's SGD arithmetic, without torch's compiler stack."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sim.models import ModelSpec, build_model
from sim.training import SGD


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 5e-4)])
def test_sgd_gives_torch_optim_sgds_bits(momentum: float, weight_decay: float):
    torch.manual_seed(0)
    ours, theirs = (build_model("small_cnn", ModelSpec(3, 10, 16, 8)) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    # the head is frozen for the middle steps: a parameter without a gradient keeps its momentum, as in torch
    opt_ours = SGD(ours.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model.head.requires_grad_(step not in (2, 3))
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(ours.head.weight, build_model("small_cnn", ModelSpec(3, 10, 16, 8)).head.weight)


def test_a_client_update_does_not_import_torchs_compiler_stack(tmp_path):
    """torch.optim's optimizers import torch._dynamo (about 1 s and 70 MB per process); a client actor never needs it."""
    code = f"""
import sys
from pathlib import Path
import torch
from algorithms.base import Broadcast, model_weights
from tests.test_chunked_training import _worker_and_run
worker, run = _worker_and_run(Path({str(tmp_path)!r}))
update, info = worker.train(0, 1, Broadcast(model_weights(run.build_model())), -1)
assert info["metrics"]["train_steps"] > 0
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
