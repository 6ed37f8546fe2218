"""small_cnn: two conv blocks and a hidden layer."""

from __future__ import annotations

from torch import nn

from sim.models import Classifier, ModelSpec, register_model


@register_model("small_cnn")
def small_cnn(spec: ModelSpec) -> Classifier:
    """Two conv blocks and a hidden layer: trains in seconds per client on a CPU core."""
    w = spec.width
    spatial = spec.image_size // 4
    features = nn.Sequential(
        # pool before ReLU: the same function (max commutes with a monotone map), a quarter of the ReLU work
        nn.Conv2d(spec.in_channels, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.BatchNorm2d(2 * w),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * w * spatial * spatial, 4 * w),
        nn.ReLU(),
    )
    return Classifier(features, 4 * w, spec.num_classes)
