"""peft LoRA layers that, for small layers, add the low-rank update to the weight, not to the output.

peft's LoRA layer computes ``base(x) + s * B(A(x))``: for a convolution that is three
convolutions forward and five kernels backward, most of them tiny (rank 8) and so bound by
per-call overhead on a CPU. The same function is ``conv(x, W + s * B A)``: one convolution of
the base's shape, whose backward adds a single weight gradient, from which autograd reaches
``A`` and ``B`` through the small product. On the default tiny backbone a client LoRA step
(32 images, forward and backward, one thread) went from 0.228 to 0.198 s; results agree with
peft's forward to float rounding (tests/test_warmfed_diffusion.py).

That weight gradient costs as much as the layer's forward, which is cheap only while the layer is
small: for a wide layer (Stable Diffusion's 320-1,280 channels) it is 10-50 times the low-rank
branch's arithmetic, and per-call overhead no longer matters. So a layer takes the weight-space
path only when its dense update costs at most ``MAX_DENSE_COST`` times the low-rank branch
(every layer of the tiny backbone: 0.04-2.5), and peft's forward otherwise.

The layers subclass peft's, so injection, state-dict keys, ``merge`` and ``get_base_layer``
are peft's own; only the plain case (one active, unmerged, vanilla adapter without dropout,
no per-row adapter names) takes the weight-space path, everything else peft's forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_lora

__all__ = ["WeightSpaceConv2d", "WeightSpaceLinear", "WEIGHT_SPACE_LAYERS", "MAX_DENSE_COST", "dense_cost"]

#: the largest ratio of dense-update to low-rank-branch arithmetic that takes the weight-space path
MAX_DENSE_COST = 4.0


def dense_cost(out_features: int, in_features: int, rank: int) -> float:
    """Arithmetic of the dense update's weight gradient over that of the low-rank branch (forward and
    two backward products), per input position; ``in_features`` counts a kernel's taps."""
    return out_features * in_features / (3 * rank * (in_features + out_features))


def _plain_adapter(layer: peft_lora.LoraLayer, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """The one adapter the weight-space forward may apply, or None when peft's forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    (name,) = active
    if name in layer.lora_variant or not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    return name


def _small(weight: torch.Tensor, rank: int) -> bool:
    return dense_cost(weight.shape[0], weight[0].numel(), rank) <= MAX_DENSE_COST


class WeightSpaceConv2d(peft_lora.Conv2d):
    """peft's LoRA ``Conv2d`` computing ``conv(x, W + s * B A)`` in one convolution when small."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        name = _plain_adapter(self, args, kwargs)
        if name is None or not isinstance(base, torch.nn.Conv2d) or base.groups != 1:
            return super().forward(x, *args, **kwargs)
        a: torch.Tensor = self.lora_A[name].weight  # type: ignore[assignment]
        b: torch.Tensor = self.lora_B[name].weight  # type: ignore[assignment]
        if b.shape[2:] != (1, 1) or not _small(base.weight, a.shape[0]):
            return super().forward(x, *args, **kwargs)
        # B is a 1x1 convolution: each output channel's update is a combination of A's kernels, one
        # matrix product (peft's get_delta_weight convolves A with B, a tiny kernel call)
        delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:]) * self.scaling[name]
        return base._conv_forward(x, base.weight + delta.to(base.weight.dtype), base.bias)


class WeightSpaceLinear(peft_lora.Linear):
    """peft's LoRA ``Linear`` computing ``x (W + s * B A)^T`` in one matrix product when small."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        name = _plain_adapter(self, args, kwargs)
        if name is None or self.fan_in_fan_out or not isinstance(base, torch.nn.Linear):
            return super().forward(x, *args, **kwargs)
        rank = int(self.lora_A[name].weight.shape[0])  # type: ignore[index]
        if not _small(base.weight, rank):
            return super().forward(x, *args, **kwargs)
        weight = base.weight + self.get_delta_weight(name).to(base.weight.dtype)
        return F.linear(x, weight, base.bias)


#: base layer type -> LoRA layer, for ``peft.LoraConfig._register_custom_module``
WEIGHT_SPACE_LAYERS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.Conv2d: WeightSpaceConv2d,
    torch.nn.Linear: WeightSpaceLinear,
}
