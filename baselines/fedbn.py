"""FedBN (Li et al., 2021): every BatchNorm layer stays local, everything else is FedAvg.

BN affine parameters *and* running statistics are personal (the paper's Algorithm 1 excludes
the whole BN layer from averaging), which absorbs per-client feature shift. The patterns are
computed from the model's BN module names, so the method works on any registered model (on a
model without BN, e.g. resnet_gn, nothing is personal and it trains exactly like FedAvg).
Like every partial-sharing method it reports no global accuracy: the server has no BN layers.
"""

from __future__ import annotations

from algorithms.base import RunContext
from algorithms.registry import register
from baselines.common import PartialSharing, batchnorm_modules


@register("fedbn")
class FedBN(PartialSharing):
    def __init__(self, params: object, run: RunContext) -> None:
        super().__init__(params, run)
        self.personal_patterns = tuple(f"{name}.*" for name in batchnorm_modules(run.build_model()))
