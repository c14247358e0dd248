"""Model hooks that some weights files need (named in `Preprocessing.hooks`).

A hook changes how a built model computes, never its weights; it is applied after loading
(`Preprocessing.apply_hooks`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def keras_avgpool_semantics(model: nn.Module) -> nn.Module:
    """Make the 3x3 stride-1 average pool in front of every Inception ``branch_pool`` ignore
    the zero padding, as Keras/TF ``same`` pooling does (torchvision counts the padding, which
    scales border positions by 4/9 or 6/9). Needed for weights converted from Keras
    (see shared/weights/MANIFEST.md, section 2). Changes no weights."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    def exclude_padding(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple:
        x = args[0]
        ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
        valid_fraction = F.avg_pool2d(ones, 3, 1, 1)  # count_include_pad=True, as torchvision
        return (x / valid_fraction,)

    for module in model.modules():
        if isinstance(module, (InceptionA, InceptionC, InceptionE)):
            module.branch_pool.register_forward_pre_hook(exclude_padding)
    return model


HOOKS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "keras_avgpool": keras_avgpool_semantics,
}
