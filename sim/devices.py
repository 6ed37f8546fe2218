"""The device a process computes on, picked from the GPUs Ray assigned to it.

`torch.cuda.is_available()` only says a GPU exists on the node, not that this process may use
it: an actor that Ray gave no GPU share and that still used GPU 0 would compete, unaccounted,
with the actors that hold shares of it. So the device follows the assignment; the process-wide
value is kept here for code that has no context to read it from (a server verb such as
`finish_round`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_process_device = torch.device("cpu")


def select_device(gpu_ids: Sequence[object], cuda_available: bool) -> torch.device:
    """cuda:0 (the first GPU Ray made visible to this process) when it was given one and CUDA works; else CPU."""
    return torch.device("cuda:0") if gpu_ids and cuda_available else torch.device("cpu")


def set_process_device(device: torch.device) -> None:
    global _process_device
    _process_device = torch.device(device)


def process_device() -> torch.device:
    """The device this process was given (CPU outside an actor with a GPU share)."""
    return _process_device
