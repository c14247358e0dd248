"""`featsvm explain`: where a run's model looks, as heatmaps and in numbers.

Works on every kind of run record (`featsvm.predict.Predictor` loads it exactly as
``predict`` does):

* ``gradcam``: Grad-CAM on the last convolutional feature maps of an **end-to-end** run (the
  fine-tuned backbone's maps before its global pool, the basic CNN's last block);
* ``cam``: the exact class activation map of a **head** run whose head is affine in globally
  pooled conv features (logistic regression after StandardScaler / PCA, on a ``gap``,
  ``mixed_6c`` or ``pre_logits`` embedding): the map adds up to the head's logit (see
  `featsvm.evaluation.explanations`). For a fine-tuned backbone (pool + linear head) Grad-CAM
  *is* this map, so ``cam`` runs it;
* ``occlusion``: occlusion sensitivity, for any run (SVM heads, fc7 embeddings ...);
* ``auto``: gradcam for end-to-end runs, cam where it is exact, occlusion otherwise.

The explained class is the predicted one unless a target is given. Maps are signed; the
PNGs and the shares use their positive part (evidence *for* the class).

"Where it looks" (`where_it_looks`): over a split of the run's own predictions (test by
default) the share of positive heat on white cells, on the background and on the
bottom-right annotation box, next to each region's share of the image (what a flat map
would give); a randomisation check (Adebayo et al. 2018: the same maps from the model with
re-initialised weights must differ; Spearman rank correlation per image); a panel of
examples. Written to ``<run>/explain/`` (``where.json``, ``where.csv``, ``examples.png``)
where `featsvm report` finds it.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.data.dataset import ImageError, load_rgb
from featsvm.errors import MissingInputError, UsageError
from featsvm.evaluation import explanations as ex
from featsvm.fileio import write_json_atomic, write_text_atomic
from featsvm.labels import LABELS, malignant_probability, predicted_label
from featsvm.predict import Predictor, collect_inputs

METHODS = ("auto", "gradcam", "cam", "occlusion")
EXPLAIN_DIR, WHERE_JSON, WHERE_CSV, EXAMPLES_PNG = (
    ex.EXPLAIN_DIR, ex.WHERE_JSON, ex.WHERE_CSV, ex.EXAMPLES_PNG)


@dataclass
class Explanation:
    file: str
    method: str
    target: str  # the explained class
    proba: np.ndarray  # (len(LABELS),)
    heat: np.ndarray  # [H, W] on the original image, signed
    visible: np.ndarray  # [H, W] bool: where the model saw the image
    raw: np.ndarray  # the map at the model's resolution (for rank correlations)

    @property
    def pred_label(self) -> str:
        return predicted_label(self.proba)

    @property
    def prob_malignant(self) -> float:
        return malignant_probability(self.proba)


class Explainer:
    """Heatmaps for a loaded run (`Predictor`)."""

    def __init__(self, predictor: Predictor, method: str = "auto", patch: int | None = None,
                 stride: int | None = None, batch_size: int = 32) -> None:
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if predictor.kind not in ("head", "end_to_end"):
            raise UsageError(f"{predictor.record.run_id} is a {predictor.kind} run: heatmaps "
                             "explain one network; explain each of its members")
        self.predictor = predictor
        self.pre = predictor.preprocessing
        crop = int(self.pre.crop or self.pre.input_size or 224)
        self.patch = int(patch or max(4, round(crop / 7)))
        self.stride = int(stride or self.patch)
        self.batch_size = batch_size
        self._affine: ex.AffineHead | None = None
        self.method = self.resolve(method)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str], method: str = "auto",
                 weights: str | os.PathLike[str] | None = None,
                 weights_dir: str | os.PathLike[str] | None = None, device: str = "auto",
                 **kw: Any) -> Explainer:
        return cls(Predictor.from_run(run_dir, weights, weights_dir, device), method, **kw)

    # ------------------------------------------------------------ what can be done

    @property
    def kind(self) -> str:
        return self.predictor.kind

    def _head_cut(self) -> tuple[Any, Any]:
        cut = ex.split_at_global_pool(self.predictor.parts["embedder"])
        if cut is None:
            raise UsageError(
                f"{self.predictor.record.run_id}: its embedding "
                f"({self.pre.layer}) is not a global average of conv features, so it "
                "has no class activation map; use --method occlusion")
        return cut

    def affine(self) -> ex.AffineHead:
        if self._affine is None:
            head = self.predictor.parts["head"]
            dim = int(self.pre.dim or 0)
            if dim <= 0:
                raise UsageError("the run's preprocessing records no embedding size (dim)")
            from featsvm.models.heads import decision_estimator, temperature_of

            # a temperature-scaled head is still affine: logits / T of the frozen pipeline
            # (sigmoid / isotonic maps are not, and affine_head refuses them)
            t = temperature_of(head)
            aff = ex.affine_head(decision_estimator(head) if t else head.estimator, dim)
            self._affine = aff if not t else ex.AffineHead(aff.W / t, aff.b / t, aff.classes)
        return self._affine

    def _net_cut(self) -> tuple[Any, Any]:
        from torch import nn

        net = self.predictor.parts["net"]
        if hasattr(net, "embedder") and hasattr(net, "head"):
            cut = ex.split_at_global_pool(net.embedder)
            if cut is None:
                raise UsageError("the fine-tuned network has no global pool to cut at")
            return cut[0], nn.Sequential(*cut[1], net.head)
        if hasattr(net, "features") and hasattr(net, "classifier"):
            return net.features, net.classifier
        return ex.last_conv_split(net)

    def resolve(self, method: str) -> str:
        """The method actually used (auto resolved), or UsageError saying why not."""
        if self.kind == "end_to_end":
            if method in ("auto", "gradcam"):
                return "gradcam"
            if method == "cam":
                net = self.predictor.parts["net"]
                if hasattr(net, "embedder"):
                    return "gradcam"  # global pool + linear head: Grad-CAM is the exact CAM
                raise UsageError("the basic CNN has dense layers after its convolutions: no "
                                 "exact CAM; use --method gradcam or occlusion")
            return method
        if method == "gradcam":
            raise UsageError("a head run's head is a scikit-learn model (no gradients): use "
                             "--method cam (logistic regression) or occlusion")
        if method in ("auto", "cam"):
            try:
                self._head_cut()
                self.affine()
                return "cam"
            except UsageError:
                if method == "cam":
                    raise
                return "occlusion"
        return method

    # ------------------------------------------------------------ inputs and scores

    def inputs(self, images: Sequence[Any]) -> Any:
        """The normalised batch the model sees (as predict builds it)."""
        import torch

        p = self.predictor
        dev = p.parts["device"]
        if self.kind == "end_to_end":
            nz = p.parts["normaliser"]
            pixels = torch.stack([nz.to_uint8(p.transform(im)) for im in images])
            return nz(pixels.float().div_(255.0)).to(dev)
        return torch.stack([p.transform(im) for im in images]).to(dev)

    def score(self, x: Any) -> np.ndarray:
        """Class probabilities [n, len(LABELS)] of a normalised batch."""
        import torch

        with torch.inference_mode():
            if self.kind == "end_to_end":
                logits = self.predictor.parts["net"](x)
                return torch.softmax(logits.float(), dim=1).cpu().double().numpy()
            feats = self.predictor.parts["embedder"](x)
            return self.predictor.parts["head"].predict_proba(feats.float().cpu().numpy())

    # ------------------------------------------------------------ maps

    def maps(self, x: Any, target: Sequence[int] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(signed maps [N, h, w] at model resolution, probabilities [N, K], explained class
        indices [N] in LABELS order)."""
        import torch

        tgt_given = None if target is None else np.asarray(target, dtype=int)
        if self.method == "occlusion":
            proba = self.score(x)
            tgt = tgt_given if tgt_given is not None else proba.argmax(axis=1)
            maps = ex.occlusion(self.score, x, tgt, self.patch, self.stride, ex.median_fill(x),
                                self.batch_size)
            return maps, proba, tgt
        if self.method == "gradcam":
            trunk, tail = self._net_cut()
            t = None if tgt_given is None else torch.as_tensor(tgt_given, device=x.device)
            cam, logits = ex.gradcam(trunk, tail, x.float(), t)
            proba = torch.softmax(logits.float(), dim=1).cpu().double().numpy()
            tgt = tgt_given if tgt_given is not None else proba.argmax(axis=1)
            return cam.cpu().double().numpy(), proba, tgt
        # exact CAM of an affine head: one pass through the trunk gives maps and features
        trunk, pool = self._head_cut()
        aff = self.affine()
        with torch.inference_mode():
            A = trunk(x).float()
            feats = pool(A).cpu().numpy()
        proba = self.predictor.parts["head"].predict_proba(feats)
        tgt = tgt_given if tgt_given is not None else proba.argmax(axis=1)
        per_class = ex.linear_cam(A.cpu(), aff).numpy()
        idx = [aff.classes.index(LABELS[t]) for t in tgt]
        return per_class[np.arange(len(idx)), idx], proba, tgt

    def explain(self, images: Sequence[Any], names: Sequence[str] | None = None,
                target: str | None = None) -> list[Explanation]:
        """One `Explanation` per PIL RGB image (batched)."""
        names = list(names) if names is not None else [str(i) for i in range(len(images))]
        out: list[Explanation] = []
        tgt_idx = None if target is None else LABELS.index(target)
        step = max(1, self.batch_size if self.method != "occlusion" else 4)
        for s in range(0, len(images), step):
            chunk = list(images[s:s + step])
            x = self.inputs(chunk)
            t = None if tgt_idx is None else [tgt_idx] * len(chunk)
            maps, proba, tgt = self.maps(x, t)
            for j, im in enumerate(chunk):
                heat, visible = ex.to_image(maps[j], self.pre, im.size)
                out.append(Explanation(names[s + j], self.method, LABELS[int(tgt[j])],
                                       proba[j], heat, visible, maps[j]))
        return out

    # ------------------------------------------------------------ randomisation check

    def randomised(self, seed: int = 0, layers: str = "all") -> Explainer:
        """This explainer on a copy of the model with re-initialised weights (Adebayo et al.
        2018). ``layers="all"``: cascading randomisation to every layer (an end-to-end network
        throughout; a head run's backbone and, where the head is linear, its coefficients);
        ``"top"``: only the last layer (the final linear layer of a network; a head run's
        linear head)."""
        import torch

        if layers not in ("all", "top"):
            raise UsageError(f"layers must be 'all' or 'top', got {layers!r}")
        p = self.predictor
        parts = dict(p.parts)
        key = "net" if self.kind == "end_to_end" else "embedder"
        if self.kind == "end_to_end" or layers == "all":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = copy.deepcopy(parts[key])
                resettable = [m for m in module.modules()
                              if callable(getattr(m, "reset_parameters", None))]
                for m in resettable if layers == "all" else resettable[-1:]:
                    m.reset_parameters()
                module.eval()
                parts[key] = module
        if self.kind == "head":
            parts["head"] = _randomised_head(parts["head"], seed)
        clone = Predictor(p.record, p._proba_fn, p.transform, **parts)
        return Explainer(clone, self.method, self.patch, self.stride, self.batch_size)


def _randomised_head(head: Any, seed: int) -> Any:
    """A copy of a FittedHead whose final linear layer (if any) has random coefficients."""
    from featsvm.models.heads import decision_estimator

    out = copy.deepcopy(head)
    est = decision_estimator(out)  # inside a calibration map, the frozen pipeline
    clf = est.steps[-1][1] if hasattr(est, "steps") else est
    if hasattr(clf, "coef_"):
        rng = np.random.default_rng(seed)
        scale = float(np.std(clf.coef_)) or 1.0
        clf.coef_ = rng.normal(0.0, scale, clf.coef_.shape)
        clf.intercept_ = rng.normal(0.0, scale, np.shape(clf.intercept_))
    return out


# ---------------------------------------------------------------- files in, PNGs out


def _stem(name: str, used: set[str]) -> str:
    stem = Path(name).stem or "image"
    cand, i = stem, 1
    while cand in used:
        i += 1
        cand = f"{stem}-{i}"
    used.add(cand)
    return cand


@dataclass
class ExplainResult:
    run_id: str
    method: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def explain_files(run_dir: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]],
                  out_dir: str | os.PathLike[str], method: str = "auto",
                  target: str | None = None, weights: str | None = None,
                  weights_dir: str | os.PathLike[str] | None = None, device: str = "auto",
                  patch: int | None = None, stride: int | None = None,
                  cell_mask: Callable[[Any], np.ndarray] | None = None,
                  progress: bool = True) -> ExplainResult:
    """Write ``<stem>.<method>.png`` (overlay) per image into `out_dir` and a ``heatmaps.csv``
    with the prediction and the heat shares per image."""
    from tqdm import tqdm

    exp = Explainer.from_run(run_dir, method, weights, weights_dir, device, patch=patch,
                             stride=stride)
    files, skipped = collect_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = ExplainResult(exp.predictor.record.run_id, exp.method, skipped=skipped)
    used: set[str] = set()
    for path in tqdm(files, desc="explain", unit="img", disable=not progress):
        try:
            im = load_rgb(path)
        except (ImageError, OSError) as exc:
            res.skipped.append((str(path), str(exc)))
            continue
        (e,) = exp.explain([im], [str(path)], target)
        png = out / f"{_stem(path.name, used)}.{e.method}.png"
        ex.overlay(im, e.heat, e.visible).save(png)
        res.files.append(png)
        shares = ex.heat_shares(e.heat, ex.regions(im, cell_mask), e.visible)
        res.rows.append({"file": str(path), "heatmap": png.name, "method": e.method,
                         "pred_label": e.pred_label, "prob_malignant": e.prob_malignant,
                         "explained": e.target, **shares})
    if res.rows:
        csv_path = out / "heatmaps.csv"
        write_text_atomic(csv_path, _csv(res.rows))
        res.files.append(csv_path)
    return res


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


# ---------------------------------------------------------------- where it looks


def _pick(labels: Sequence[str], n: int) -> list[int]:
    """Up to `n` indices, round-robin over the true classes (deterministic)."""
    by: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    order: list[int] = []
    queues = [by[k] for k in sorted(by)]
    while len(order) < n and any(queues):
        for q in queues:
            if q and len(order) < n:
                order.append(q.pop(0))
    return order


def _nanmean(v: Sequence[float]) -> float | None:
    a = np.asarray([x for x in v if x is not None and not math.isnan(x)], dtype=float)
    return float(a.mean()) if a.size else None


def _data_dir(record: Any, data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    d = record.config.get("data_dir")
    if not d or not Path(str(d)).is_dir():
        raise MissingInputError(f"{record.path}: no image folder recorded; give --data")
    return Path(str(d))


def _load_images(data_dir: Path, relpaths: Sequence[str]) -> list[Any]:
    ims = []
    for rel in relpaths:
        try:
            ims.append(load_rgb(data_dir / rel))
        except (ImageError, OSError) as exc:
            raise MissingInputError(f"{data_dir / rel}: {exc}; is --data the folder the run "
                                    "was trained on?") from exc
    return ims


def _randomisation_block(layers: str, v: list[float]) -> dict[str, Any]:
    return {
        "test": ("re-initialised last layer" if layers == "top" else
                 "cascading re-initialisation of every layer") + " (Adebayo et al. 2018)",
        "n_images": len(v),
        "spearman_mean": _nanmean(v),
        "spearman_median": float(np.median(v)) if v else None,
        "spearman_abs_max": float(np.max(np.abs(v))) if v else None,
    }


def _summary(exp: Explainer, split: str, n_split: int, rows: list[dict[str, Any]],
             rhos: dict[str, list[float]], cell_mask: Any) -> dict[str, Any]:
    record = exp.predictor.record
    summary: dict[str, Any] = {
        "run_id": record.run_id,
        "model": record.config.get("model"),
        "kind": exp.kind,
        "method": exp.method,
        "split": split,
        "n_images": len(rows),
        "n_split": n_split,
        "cell_detector": getattr(cell_mask, "__name__", None) or "featsvm.features.cells.detect",
        "annotation_box": list(ex.ANNOTATION_BOX),
        "share": {r: _nanmean([row[r] for row in rows]) for r in ex.REGIONS},
        "area": {r: _nanmean([row[f"area_{r}"] for row in rows]) for r in ex.REGIONS},
        "by_class": {
            lab: {r: _nanmean([row[r] for row in rows if row["true_label"] == lab])
                  for r in ex.REGIONS}
            for lab in LABELS if any(row["true_label"] == lab for row in rows)
        },
        "randomisation": {k: _randomisation_block(k, v) for k, v in rhos.items()},
    }
    if exp.method == "occlusion":
        summary["occlusion"] = {"patch": exp.patch, "stride": exp.stride}
    return summary


def _rank_correlations(exps: list[Explanation], ims: list[Any], rnd: dict[str, Explainer],
                       rhos: dict[str, list[float]], n_random: int) -> None:
    """Append Spearman(trained map, randomised map) per image until `n_random` per test."""
    tgt = [LABELS.index(e.target) for e in exps]
    for layers, r_exp in rnd.items():
        if len(rhos[layers]) >= n_random:
            continue
        r_maps, _, _ = r_exp.maps(r_exp.inputs(ims), tgt)
        for e, m in zip(exps, r_maps, strict=True):
            if len(rhos[layers]) < n_random:
                rhos[layers].append(ex.rank_correlation(e.raw, m))


def where_it_looks(
    run_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "test",
    method: str = "auto",
    limit: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    n_examples: int = 8,
    n_random: int = 16,
    weights: str | None = None,
    weights_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    patch: int | None = None,
    stride: int | None = None,
    cell_mask: Callable[[Any], np.ndarray] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Heat shares over `split` of the run's predictions; see the module docstring.
    `limit`: at most this many images (round-robin over classes), for slow methods."""
    from tqdm import tqdm

    exp = Explainer.from_run(run_dir, method, weights, weights_dir, device, patch=patch,
                             stride=stride)
    record = exp.predictor.record
    data = _data_dir(record, data_dir)
    preds = record.predictions().select(split)
    if not preds.relpath:
        raise UsageError(f"{record.path}: no {split!r} rows in predictions.csv")
    order = _pick(preds.true_label, limit if limit else len(preds.relpath))
    out = Path(out_dir) if out_dir is not None else Path(record.path) / EXPLAIN_DIR
    out.mkdir(parents=True, exist_ok=True)
    # "top" needs a last layer to re-initialise: a network's, or a linear head's coefficients
    tops = ("top",) if exp.kind == "end_to_end" or exp.method == "cam" else ()
    rnd = {layers: exp.randomised(seed=0, layers=layers) for layers in (*tops, "all")}
    rows: list[dict[str, Any]] = []
    rhos: dict[str, list[float]] = {layers: [] for layers in rnd}
    examples: list[tuple[Any, Explanation]] = []
    ex_idx = set(_pick([preds.true_label[i] for i in order], n_examples))
    step = 8 if exp.method != "occlusion" else 2
    for s in tqdm(range(0, len(order), step), desc=f"explain {record.run_id}", unit="batch",
                  disable=not progress):
        chunk = order[s:s + step]
        ims = _load_images(data, [preds.relpath[i] for i in chunk])
        exps = exp.explain(ims, [preds.relpath[i] for i in chunk])
        _rank_correlations(exps, ims, rnd, rhos, n_random)
        for k, (i, im, e) in enumerate(zip(chunk, ims, exps, strict=True)):
            shares = ex.heat_shares(e.heat, ex.regions(im, cell_mask), e.visible)
            rows.append({"relpath": preds.relpath[i], "true_label": preds.true_label[i],
                         "pred_label": e.pred_label, "explained": e.target, **shares})
            if (s + k) in ex_idx:
                examples.append((im, e))
    summary = _summary(exp, split, len(preds.relpath), rows, rhos, cell_mask)
    write_json_atomic(out / WHERE_JSON, summary)
    write_text_atomic(out / WHERE_CSV, _csv(rows))
    if examples:
        example_panel(examples, out / EXAMPLES_PNG, title=f"{summary['model']} ({exp.method})")
    summary["out_dir"] = str(out)
    return summary


def example_panel(examples: Sequence[tuple[Any, Explanation]], path: Path, title: str = ""
                  ) -> Path:
    """A grid of overlays with true (from the file name when known), predicted and explained
    class."""
    from featsvm.evaluation.figures import _new_figure, save_png

    n = len(examples)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _new_figure(2.6 * cols, 2.9 * rows)
    for k, (im, e) in enumerate(examples):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(ex.overlay(im, e.heat, e.visible))
        ax.set_axis_off()
        ax.set_title(f"{Path(e.file).parent.name}/{Path(e.file).stem[-12:]}\n"
                     f"pred {e.pred_label} ({e.proba.max():.2f})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_png(fig, path)
