"""Heatmaps of where a model looks, and how to measure them.

Model-independent pieces used by `featsvm.explain` (which loads runs) and `featsvm serve`:

* `split_at_global_pool`: cut a network at its global average pool, so that its last
  convolutional feature maps ``A`` ([N, C, h, w]) are reachable;
* `gradcam`: Grad-CAM (Selvaraju et al. 2017) without hooks: ``A`` is computed by the trunk,
  made a leaf that needs a gradient, and the rest of the network is run on it;
* `affine_head` + `linear_cam`: the **exact** class activation map (Zhou et al. 2016) of a
  head that is affine in the globally pooled features. A scikit-learn pipeline
  ``StandardScaler -> PCA -> LogisticRegression`` is affine end to end: with ``g`` the pooled
  feature, its logits are ``W g + b`` (``W = coef @ components / sqrt(var) (whitened PCA) @
  diag(1 / scale)``). ``W`` and ``b`` are recovered by evaluating the pipeline's
  ``decision_function`` at 0 and the unit vectors, and the recovery is checked on random
  points, so a pipeline that is not affine (an RBF SVM, a calibrated map) is refused rather
  than explained wrongly. Because ``g`` is the mean of ``A`` over positions,
  ``logit_c = mean_ij (W_c . A_ij) + b_c``: the map ``W_c . A_ij`` adds up exactly to the
  logit (a test checks it);
* `occlusion`: occlusion sensitivity (Zeiler & Fergus 2014) for any model: patches of the
  input are filled with the image's median colour (background-like on a smear) and the drop
  in the probability of the explained class is averaged over the patches covering a pixel;
  all occluded copies of an image go through the model in batches;
* `to_image`: a map on the model's input crop back onto the original image (undoing the
  run's resize + centre crop; what the crop cut off gets no heat and is marked not seen);
* `overlay`: the PNG drawn for a person;
* `regions` / `heat_shares`: the share of (positive) heat on white cells, on the burnt-in
  annotation corner and on the rest (background); `rank_correlation` for the randomisation
  check of Adebayo et al. 2018.

White cells are those of the cell detector (`featsvm.features.cells.detect`: nucleus-colour
threshold, morphology, watershed split, size filter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featsvm.errors import UsageError
from featsvm.features.preprocessing import Preprocessing

# The annotation box: bottom-right corner, the same fractions as data.duplicates ignores
# (25 % of the width x 20 % of the height); every image of the releases we looked at carries
# its scale annotation there.
ANNOTATION_BOX = (0.25, 0.2)
REGIONS = ("cells", "background", "corner")
# where `featsvm explain --split` writes inside a run folder (and `featsvm report` reads)
EXPLAIN_DIR = "explain"
WHERE_JSON = "where.json"
WHERE_CSV = "where.csv"
EXAMPLES_PNG = "examples.png"


# ---------------------------------------------------------------- cutting a network


def _flat(module: nn.Module) -> list[nn.Module]:
    if type(module) is nn.Sequential:
        return [m for child in module for m in _flat(child)]
    return [module]


def _is_global_avg_pool(m: nn.Module) -> bool:
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size
        return size in (1, (1, 1), [1, 1])
    # timm's SelectAdaptivePool2d(pool_type="avg")
    return type(m).__name__ == "SelectAdaptivePool2d" and getattr(m, "pool_type", "") == "avg"


def split_at_global_pool(net: nn.Module) -> tuple[nn.Sequential, nn.Sequential] | None:
    """(trunk, tail) with ``net(x) == tail(trunk(x))`` where ``trunk`` ends at the last
    convolutional feature maps and ``tail`` starts with a global average pool followed only by
    flattening. None when the network does not end in such a pool (e.g. a VGG fc7 embedder)."""
    stages = _flat(net)
    for i in range(len(stages) - 1, -1, -1):
        if _is_global_avg_pool(stages[i]):
            rest = stages[i + 1:]
            if all(isinstance(m, nn.Flatten | nn.Identity) for m in rest):
                return nn.Sequential(*stages[:i]), nn.Sequential(*stages[i:])
            return None
    return None


def last_conv_split(net: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """(trunk, tail) for Grad-CAM: at the global pool when there is one, else after the last
    stage whose output is still a feature map (4-d); the caller checks the shape."""
    cut = split_at_global_pool(net)
    if cut is not None:
        return cut
    stages = _flat(net)
    for i in range(len(stages) - 1, -1, -1):
        if isinstance(stages[i], nn.Flatten):
            return nn.Sequential(*stages[:i]), nn.Sequential(*stages[i:])
    raise UsageError(f"cannot find the last convolutional feature maps of {type(net).__name__}")


# ---------------------------------------------------------------- Grad-CAM and CAM


def gradcam(trunk: nn.Module, tail: nn.Module, x: torch.Tensor,
            target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed Grad-CAM maps [N, h, w] (before the ReLU) for class indices `target` (default:
    the arg-max) and the logits [N, K]. Gradients are taken on the logits."""
    with torch.enable_grad():
        with torch.no_grad():
            A = trunk(x)
        if A.ndim != 4:
            raise UsageError(f"Grad-CAM needs 4-d feature maps, got shape {tuple(A.shape)}")
        A = A.detach().float().requires_grad_(True)
        logits = tail(A)
        if target is None:
            target = logits.argmax(dim=1)
        score = logits.gather(1, target.view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, A)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = (weights * A.detach()).sum(dim=1)
    return cam, logits.detach()


@dataclass(frozen=True)
class AffineHead:
    """logits = features @ W.T + b for the head's classes (`classes`, strings)."""

    W: np.ndarray  # [K, C]
    b: np.ndarray  # [K]
    classes: tuple[str, ...]


def _decision(estimator: Any, X: np.ndarray) -> np.ndarray:
    d = np.asarray(estimator.decision_function(X), dtype=np.float64)
    if d.ndim == 1:  # binary: sklearn gives the log-odds of classes_[1]
        d = np.stack([-d / 2, d / 2], axis=1)
    return d


def _is_linear(estimator: Any) -> bool:
    """A Pipeline of StandardScaler / PCA / passthrough steps ending in a linear classifier
    (decision = X @ coef_.T + intercept_), or such a classifier alone."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model._base import LinearClassifierMixin
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [s for _, s in estimator.steps] if isinstance(estimator, Pipeline) else [estimator]
    *pre, last = steps
    return isinstance(last, LinearClassifierMixin) and all(
        s is None or s == "passthrough" or isinstance(s, StandardScaler | PCA) for s in pre)


def affine_head(estimator: Any, dim: int, seed: int = 0, rtol: float = 1e-6) -> AffineHead:
    """The affine map from pooled features to logits of a fitted scikit-learn estimator (a
    Pipeline of StandardScaler / PCA / LogisticRegression, ...). Raises UsageError when the
    estimator has no decision function or is not affine in its input."""
    if not _is_linear(estimator):
        raise UsageError("the head is not linear in the pooled features (an SVM, a calibrated "
                         "map ...): no exact class activation map; use --method occlusion")
    X = np.vstack([np.zeros((1, dim)), np.eye(dim)])
    try:
        d = _decision(estimator, X)
    except (AttributeError, ValueError) as exc:
        raise UsageError(f"cannot evaluate the head's decision function: {exc}") from exc
    b = d[0]
    W = (d[1:] - b).T  # [K, C]
    rng = np.random.default_rng(seed)
    probe = rng.normal(0.0, 1.0, (8, dim)) * 3.0
    want = _decision(estimator, probe)
    got = probe @ W.T + b
    scale = max(1.0, float(np.abs(want).max()))
    if not np.allclose(got, want, rtol=0, atol=rtol * scale * 100):
        raise UsageError("the head's decision function is not affine in the pooled features: "
                         "no exact class activation map; use --method occlusion")
    classes = tuple(str(c) for c in getattr(estimator, "classes_", range(W.shape[0])))
    return AffineHead(W, b, classes)


def linear_cam(A: torch.Tensor, head: AffineHead) -> torch.Tensor:
    """Per-class maps [N, K, h, w] with ``maps.mean((2, 3)) + b == logits`` exactly."""
    W = torch.as_tensor(head.W, dtype=torch.float64)
    return torch.einsum("kc,nchw->nkhw", W, A.double())


# ---------------------------------------------------------------- occlusion


def occlusion(score_fn: Callable[[torch.Tensor], np.ndarray], x: torch.Tensor,
              target: np.ndarray, patch: int, stride: int, fill: torch.Tensor,
              batch_size: int = 32) -> np.ndarray:
    """Occlusion sensitivity maps [N, H, W] (input resolution, signed).

    `score_fn`: normalised batch -> class probabilities [n, K]; `target`: the class index
    explained per image; `fill`: [N, 3] colour (in the input's normalised space) put into each
    patch. Value at a pixel = mean over the patches that cover it of P(target | x) -
    P(target | x with the patch filled)."""
    n, _, H, W = x.shape
    ys = list(range(0, max(H - patch, 0) + 1, stride))
    xs = list(range(0, max(W - patch, 0) + 1, stride))
    if ys[-1] + patch < H:
        ys.append(H - patch)
    if xs[-1] + patch < W:
        xs.append(W - patch)
    boxes = [(y, x0) for y in ys for x0 in xs]
    base = score_fn(x)
    out = np.zeros((n, H, W))
    count = np.zeros((H, W))
    for y, x0 in boxes:
        count[y:y + patch, x0:x0 + patch] += 1
    for i in range(n):
        p0 = base[i, target[i]]
        drops = []
        for s in range(0, len(boxes), batch_size):
            chunk = boxes[s:s + batch_size]
            xb = x[i:i + 1].repeat(len(chunk), 1, 1, 1)
            for j, (y, x0) in enumerate(chunk):
                xb[j, :, y:y + patch, x0:x0 + patch] = fill[i].view(3, 1, 1)
            drops.extend((p0 - score_fn(xb)[:, target[i]]).tolist())
        for (y, x0), d in zip(boxes, drops, strict=True):
            out[i, y:y + patch, x0:x0 + patch] += d
    return out / np.maximum(count, 1)[None]


def median_fill(x: torch.Tensor) -> torch.Tensor:
    """[N, 3]: each image's per-channel median (the background colour of a smear)."""
    return x.flatten(2).median(dim=2).values


# ---------------------------------------------------------------- back onto the image


def crop_geometry(pre: Preprocessing, size: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """(resized_w, resized_h, left, top, crop) of the run's Resize(shorter side) +
    CenterCrop on an image of `size` = (w, h), as torchvision computes them."""
    w, h = size
    r, crop = pre.resize, pre.crop
    if w <= h:
        rw, rh = r, int(r * h / w)
    else:
        rw, rh = int(r * w / h), r
    left = int(round((rw - crop) / 2.0))
    top = int(round((rh - crop) / 2.0))
    return rw, rh, left, top, crop


def to_image(heat: np.ndarray, pre: Preprocessing, size: tuple[int, int]
             ) -> tuple[np.ndarray, np.ndarray]:
    """(heat [h, w] on the model's input crop -> [H, W] on the original image, visible mask
    [H, W] bool: where the model saw the image)."""
    rw, rh, left, top, crop = crop_geometry(pre, size)
    t = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    t = F.interpolate(t, size=(crop, crop), mode="bilinear", align_corners=False)
    canvas = torch.zeros((1, 2, rh, rw))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + crop, rh), min(left + crop, rw)
    canvas[0, 0, y0:y1, x0:x1] = t[0, 0, y0 - top:y1 - top, x0 - left:x1 - left]
    canvas[0, 1, y0:y1, x0:x1] = 1.0
    w, h = size
    back = F.interpolate(canvas, size=(h, w), mode="bilinear", align_corners=False)[0]
    return back[0].numpy(), back[1].numpy() > 0.5


def normalise(heat: np.ndarray) -> np.ndarray:
    """Positive part scaled to [0, 1] (all zeros stays zeros)."""
    pos = np.maximum(np.asarray(heat, dtype=np.float64), 0.0)
    top = pos.max() if pos.size else 0.0
    return pos / top if top > 0 else pos


def overlay(image: Image.Image, heat: np.ndarray, visible: np.ndarray | None = None,
            alpha: float = 0.5) -> Image.Image:
    """`image` with the positive part of `heat` ([H, W], image coordinates) in the 'jet'
    colour map on top; what the model never saw (cropped off) is dimmed."""
    from matplotlib import colormaps

    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    h = normalise(heat)
    colour = colormaps["jet"](h)[..., :3]
    out = (1 - alpha) * rgb + alpha * colour
    if visible is not None:
        out[~visible] = rgb[~visible] * 0.35
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- where it looks


def annotation_mask(size: tuple[int, int], frac: tuple[float, float] = ANNOTATION_BOX
                    ) -> np.ndarray:
    """[H, W] bool: the bottom-right annotation box."""
    w, h = size
    bw, bh = round(frac[0] * w), round(frac[1] * h)
    m = np.zeros((h, w), dtype=bool)
    m[h - bh:, w - bw:] = True
    return m


def white_cell_mask(image: Image.Image) -> np.ndarray:
    """[H, W] bool: the white cells `featsvm.features.cells.detect` finds in a field."""
    from featsvm.features.cells import detect

    w, h = image.size
    m = np.zeros((h, w), dtype=bool)
    for c in detect(image).cells:
        r0, c0, r1, c1 = c.bbox
        m[r0:r1, c0:c1] |= c.mask
    return m


def regions(image: Image.Image, cell_mask: Callable[[Image.Image], np.ndarray] | None = None,
            frac: tuple[float, float] = ANNOTATION_BOX) -> dict[str, np.ndarray]:
    """Disjoint masks: corner (annotation box), cells (outside the box), background (rest)."""
    corner = annotation_mask(image.size, frac)
    cells = (cell_mask or white_cell_mask)(image) & ~corner
    return {"cells": cells, "background": ~cells & ~corner, "corner": corner}


def heat_shares(heat: np.ndarray, masks: dict[str, np.ndarray],
                visible: np.ndarray | None = None) -> dict[str, float]:
    """Share of the positive heat in each region (sums to 1; NaN when there is no heat), and
    ``area_<region>``: the region's share of the visible image (what a flat map would give)."""
    pos = np.maximum(np.asarray(heat, dtype=np.float64), 0.0)
    vis = np.ones(pos.shape, dtype=bool) if visible is None else visible
    total = float(pos[vis].sum())
    n_vis = max(int(vis.sum()), 1)
    out: dict[str, float] = {}
    for name, m in masks.items():
        out[name] = float(pos[m & vis].sum() / total) if total > 0 else float("nan")
        out[f"area_{name}"] = float((m & vis).sum() / n_vis)
    return out


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (flattened); 0 when either is constant."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def read_where(run_dir: str | Path) -> dict[str, Any] | None:
    """The where-it-looks summary `featsvm explain --split` wrote for a run (None if none or
    unreadable)."""
    import json

    path = Path(run_dir) / EXPLAIN_DIR / WHERE_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
