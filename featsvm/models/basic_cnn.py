"""The reference study's "basic CNN" (Ghongade et al. 2023, section 2.1), trained from scratch.

The study describes a plain stack of blocks, each a 3x3 convolution with ReLU followed by a
2x2 max-pool, then flatten, one dense layer with ReLU, dropout and a softmax over the classes.
It gives no exact widths for every layer, so the widths here are the usual doubling ladder
(32, 64, 128, 128) and a 128-unit dense layer; the input is 128 px so that a full training
run fits a 2-core CPU budget (the size is recorded in the run's preprocessing).

The module returns logits: the softmax lives in the loss (cross-entropy) during training and
in `predict_proba`-style code at inference, which is numerically safer than a softmax layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from featsvm.errors import ConfigError
from featsvm.features.preprocessing import Preprocessing

# ImageNet statistics are a sensible fixed normalisation for RGB smears even from scratch;
# what matters is that training and prediction use the same numbers (they travel in the run).
BASIC_CNN_MEAN = (0.485, 0.456, 0.406)
BASIC_CNN_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BasicCNNSpec:
    input_size: int = 128
    channels: tuple[int, ...] = (32, 64, 128, 128)
    dense: int = 128
    dropout: float = 0.5


class BasicCNN(nn.Module):
    """[conv3x3 -> ReLU -> maxpool2x2] x len(channels) -> flatten -> dense -> ReLU -> dropout
    -> linear (logits)."""

    def __init__(self, num_classes: int = 4, spec: BasicCNNSpec | None = None) -> None:
        super().__init__()
        spec = spec or BasicCNNSpec()
        if spec.input_size % (2 ** len(spec.channels)):
            raise ConfigError(
                f"basic-cnn input size {spec.input_size} must be divisible by "
                f"2**{len(spec.channels)} (one 2x2 max-pool per block)"
            )
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in spec.channels:
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = spec.input_size // (2 ** len(spec.channels))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, spec.dense),
            nn.ReLU(inplace=True),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.dense, num_classes),
        )
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def basic_cnn_preprocessing(spec: BasicCNNSpec) -> Preprocessing:
    """The preprocessing of basic-cnn (recorded in the run: what `predict` must repeat)."""
    return Preprocessing(
        input_size=spec.input_size,
        resize=spec.input_size,
        crop=spec.input_size,
        interpolation="bilinear",
        mean=BASIC_CNN_MEAN,
        std=BASIC_CNN_STD,
        architecture={
            "channels": list(spec.channels), "dense": spec.dense, "dropout": spec.dropout
        },
    )
