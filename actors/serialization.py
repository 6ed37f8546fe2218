"""How tensors travel between Ray processes: as raw bytes in a numpy array, not through torch's pickling.

torch pickles a tensor by writing its storage through `torch.save` into a byte stream, about
60 µs per tensor. Every round moves dozens of small tensors per task (the broadcast, each
task's partial sums), so at 10,000 clients that was about a tenth of a client actor's time
(py-spy). A uint8 numpy view of the same bytes goes out of band in Ray's pickle-5 path at
memcpy speed (`make bench-scale`; the README's "Serialization" has the figures).

The receiver gets a writable copy on the CPU, never a read-only view of the object store
(what Ray's own `RAY_ENABLE_ZERO_COPY_TORCH_TENSORS` hands out: an in-place update of a
received tensor would then fault), and a tensor sent from a GPU arrives on the CPU, where a
receiver without a GPU can still read it. Bits are unchanged, so results are too.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

_RAW, _TORCH = "raw", "torch"


def _memory_order(tensor: torch.Tensor) -> list[int] | None:
    """The dims from outermost to innermost in memory, when the tensor is dense in that order
    (contiguous, channels-last, any permutation of either); None if it has gaps or overlaps."""
    strides = tensor.stride()
    perm = sorted(range(tensor.dim()), key=lambda d: (-strides[d], d))
    return perm if tensor.permute(perm).is_contiguous() else None


def tensor_to_wire(tensor: torch.Tensor) -> tuple[Any, ...]:
    """(raw, bytes as uint8 array in memory order, dtype name, shape, strides) for a dense tensor, so a
    channels-last weight arrives channels-last (convolutions pick their kernels by layout, and a
    different kernel rounds differently); torch's own format for anything else."""
    order = None
    if tensor.layout == torch.strided and not tensor.is_quantized and not tensor.requires_grad:
        tensor = tensor.detach().cpu()
        order = _memory_order(tensor)
    if order is None:
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return (_TORCH, buffer.getvalue())
    flat = tensor.permute(order).reshape(-1)  # the elements in memory order
    dtype = str(tensor.dtype).removeprefix("torch.")
    return (_RAW, flat.view(torch.uint8).numpy(), dtype, tuple(tensor.shape), tuple(tensor.stride()))


def tensor_from_wire(wire: tuple[Any, ...]) -> torch.Tensor:
    if wire[0] == _TORCH:
        return torch.load(io.BytesIO(wire[1]), map_location="cpu", weights_only=True)
    _, raw, dtype, shape, stride = wire
    kind = getattr(torch, dtype)
    if raw.size == 0:  # an empty uint8 array cannot be viewed as a wider dtype
        return torch.empty(shape, dtype=kind)
    # dense in memory order, so the sender's strides address exactly these elements
    return torch.from_numpy(np.array(raw, copy=True)).view(kind).as_strided(shape, stride)


def install_tensor_serializer() -> None:
    """Send this process's tensors as raw bytes (see the module docstring); a no-op outside Ray."""
    import ray

    if ray.is_initialized():
        ray.util.register_serializer(torch.Tensor, serializer=tensor_to_wire, deserializer=tensor_from_wire)
