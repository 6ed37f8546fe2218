"""Tensors between Ray processes travel as raw bytes and arrive as writable CPU copies, bit for bit."""

from __future__ import annotations

import pickle

import pytest
import torch

from actors.serialization import tensor_from_wire, tensor_to_wire


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(2, 3, dtype=torch.float64),
        torch.randn(5).to(torch.bfloat16),
        torch.arange(6, dtype=torch.int64).reshape(2, 3),
        torch.tensor(7.5),  # 0-dim
        torch.zeros(0, 4),
        torch.randn(4, 6).t(),  # non-contiguous
        torch.tensor([True, False]),
        torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last),
        torch.randn(8, 1, 3, 3).to(memory_format=torch.channels_last),
    ],
    ids=["f32", "f64", "bf16", "int64", "scalar", "empty", "transposed", "bool", "channels_last", "channels_last_c1"],
)
def test_a_dense_tensor_survives_the_wire_bit_for_bit(tensor):
    wire = tensor_to_wire(tensor)
    assert wire[0] == "raw"
    back = tensor_from_wire(pickle.loads(pickle.dumps(wire, protocol=5)))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert back.stride() == tensor.stride() or tensor.numel() == 0  # the layout too: kernels choose by it
    assert torch.equal(_bytes(back), _bytes(tensor))
    if tensor.numel() and tensor.dtype != torch.bool:
        back.add_(1)  # writable, and a copy: the tensor sent is untouched
        assert not torch.equal(_bytes(back), _bytes(tensor))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_tensors_torch_cannot_view_as_bytes_take_torchs_own_format():
    sparse = torch.eye(3).to_sparse()
    grad = torch.ones(2, requires_grad=True)
    strided = torch.arange(12.0)[::2]  # gaps between elements
    for tensor in (sparse, grad, strided):
        wire = tensor_to_wire(tensor)
        assert wire[0] == "torch"
        back = tensor_from_wire(wire)
        assert torch.equal(
            back.to_dense() if back.is_sparse else back.detach(),
            tensor.to_dense() if tensor.is_sparse else tensor.detach(),
        )


@pytest.mark.slow
def test_actors_send_tensors_through_the_raw_path(ray_local):
    """A client actor's result tensors come back equal and writable; the actor really uses the raw path."""
    import ray

    from actors.serialization import install_tensor_serializer

    @ray.remote
    class Echo:
        def __init__(self) -> None:
            install_tensor_serializer()

        def pickled(self) -> bytes:
            import ray.cloudpickle as cp

            return cp.dumps(torch.zeros(2))

        def send(self, n: int) -> dict[str, torch.Tensor]:
            torch.manual_seed(n)
            return {"w": torch.randn(8, 3), "b": torch.randn(3).to(torch.bfloat16)}

    echo = Echo.remote()
    assert b"tensor_from_wire" in ray.get(echo.pickled.remote())  # the actor's pickler takes the raw path
    got = ray.get(echo.send.remote(3))
    torch.manual_seed(3)
    assert torch.equal(got["w"], torch.randn(8, 3)) and torch.equal(got["b"], torch.randn(3).to(torch.bfloat16))
    got["w"].mul_(2)  # a read-only view of the object store would fault here
    ray.kill(echo)
