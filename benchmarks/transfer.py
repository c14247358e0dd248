"""Transfer study: does a model trained on Taleqani fields say anything about another lab's cells?

Variants (all with one frozen ImageNet backbone, default AlexNet fc7):

* ``field``            the whole 224x224 field (the baseline study's input)
* ``cells``            white cells found by featsvm.features.cells, each cropped at a normalised
                       scale with the background blacked out; an image's embedding is the mean
                       of its cells' embeddings (a single-cell image is one cell)
* ``cells+reinhard``   the same crops, Reinhard-normalised to a reference computed from
                       Taleqani TRAINING crops only
* ``cells+grey``       the same crops in greyscale (how much does colour carry?)
* ``colour_stats``     27 colour statistics (9 per RGB channel) of the field / of the cell
                       pixels: the shortcut baseline

Heads: logistic regression (C=1, standardised input, not tuned) and a linear SVM-like
logistic with the same settings are untuned on purpose: nothing is chosen on any data.
Protocol (nothing fitted or chosen on the external set):

* in-lab: grouped 5-fold CV pooled over train+val (groups = duplicate/re-capture groups of the
  split manifest), 4-class accuracy; and train -> test accuracy;
* external (e.g. C-NMC): the head trained on Taleqani train predicts P(malignant) =
  1 - P(benign); ROC-AUC with a 95 % subject-bootstrap CI (subjects resampled within class),
  the share of benign cells called malignant at the model's own decision (argmax class);
* OOD: OODFlag fitted on train embeddings, threshold = 95 % quantile of val; flagged share of
  in-lab test images and of external images.

Run (resumable; embeddings are kept under --work):

    nice -n 10 python benchmarks/transfer.py --split split.csv \
        --data ../shared/data/all-taleqani --external cnmc=../shared/data/cnmc-2019-sample \
        --weights-dir ../shared/weights --work /work/cache/transfer

Writes benchmarks/results/transfer-<backbone>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CELL_VARIANTS = ("cells", "cells+reinhard", "cells+grey")
SUBJECT = re.compile(r"UID_(H?\d+)_")


def colour_stats(pixels: np.ndarray) -> np.ndarray:
    """27 numbers: per RGB channel mean, std and the 5/10/25/50/75/90/95th percentiles."""
    if len(pixels) == 0:
        return np.zeros(27, np.float32)
    p = pixels.astype(np.float32) / 255.0
    out = []
    for c in range(3):
        v = p[:, c]
        out += [v.mean(), v.std(), *np.percentile(v, [5, 10, 25, 50, 75, 90, 95])]
    return np.array(out, np.float32)


def list_external(root: Path) -> list[tuple[str, int, str]]:
    """(relpath, is_malignant, subject) of a C-NMC-style folder (all/ and hem/)."""
    rows = []
    for sub, y in (("all", 1), ("hem", 0)):
        for p in sorted((root / sub).glob("*.png")):
            m = SUBJECT.search(p.name)
            rows.append((f"{sub}/{p.name}", y, m.group(1) if m else p.name))
    return rows


class Embedder:
    def __init__(self, backbone: str, weights_dir: str | None):
        import torch

        from featsvm.features.backbones import load_backbone

        torch.set_num_threads(2)
        self.torch = torch
        self.loaded = load_backbone(backbone, None, weights_dir)
        from torchvision import transforms as T

        pre = self.loaded.preprocessing
        self.field_transform = pre.transform()
        # cell crops are already square at the cell size: only tensor + normalisation
        self.crop_transform = T.Compose([T.ToTensor(), T.Normalize(list(pre.mean), list(pre.std))])

    def __call__(self, images, field: bool = False) -> np.ndarray:
        torch = self.torch
        tf = self.field_transform if field else self.crop_transform
        xs = torch.stack([tf(im) for im in images])
        with torch.inference_mode():
            return self.loaded.embedder(xs).float().numpy()


def embed_all(paths: list[Path], emb: Embedder, reference, work: Path, tag: str,
              variants: tuple[str, ...], cell_size: int, max_cells: int
              ) -> dict[str, np.ndarray]:
    """Per-image embeddings for every variant (+ colour stats), cached in work/<tag>.npz."""
    from PIL import Image

    from featsvm.features import stain
    from featsvm.features.cells import cell_crops

    def path(key: str) -> Path:
        return work / f"{tag}-{key}.npz"

    have = {k: np.load(path(k))["x"] for k in (*variants, "colour")
            if path(k).is_file()}
    todo = tuple(v for v in variants if v not in have)
    need_colour = "colour" not in have
    if not todo and not need_colour:
        return _unpack(have)
    feats: dict[str, list] = {v: [] for v in todo}
    feats["colour_field"], feats["colour_cells"], feats["n_cells"] = [], [], []
    t0 = time.perf_counter()
    chunk = 16  # images whose crops go through the backbone in one batch

    def variant_inputs(v: str, img, crops: list) -> list:
        ims = crops or [img.resize((cell_size, cell_size))]  # no cell: the whole field
        if v == "cells+reinhard":
            return [stain.reinhard(c, reference) for c in ims]
        if v == "cells+grey":
            return [stain.colour_free(c, "grey") for c in ims]
        return ims

    need_cells = need_colour or any(v != "field" for v in todo)
    for start in range(0, len(paths), chunk):
        imgs, crop_lists = [], []
        for p in paths[start:start + chunk]:
            img = Image.open(p).convert("RGB")
            crops = (cell_crops(img, size=cell_size, suppress_background=True,
                                max_cells=max_cells) if need_cells else [])
            imgs.append(img)
            crop_lists.append(crops)
            feats["n_cells"].append(len(crops))
            feats["colour_field"].append(colour_stats(np.asarray(img).reshape(-1, 3)))
            if crops:
                pix = np.concatenate([np.asarray(c).reshape(-1, 3) for c in crops])
                pix = pix[pix.max(axis=1) >= 16]
            else:
                pix = np.zeros((0, 3))
            feats["colour_cells"].append(colour_stats(pix))
        for v in todo:
            if v == "field":
                feats[v].extend(emb(imgs, field=True))
                continue
            sets = [variant_inputs(v, img, c) for img, c in zip(imgs, crop_lists, strict=True)]
            e = emb([x for s in sets for x in s])
            k = 0
            for s in sets:
                feats[v].append(e[k:k + len(s)].mean(axis=0))
                k += len(s)
        done = min(start + chunk, len(paths))
        if done % 96 == 0 or done == len(paths):
            rate = done / (time.perf_counter() - t0)
            print(f"  {tag}: {done}/{len(paths)} ({rate:.2f} img/s)", flush=True)
    for v in todo:
        np.savez(path(v), x=np.asarray(feats[v]))
        have[v] = np.asarray(feats[v])
    if need_colour:
        have["colour"] = np.concatenate([np.asarray(feats["colour_field"]),
                                         np.asarray(feats["colour_cells"]),
                                         np.asarray(feats["n_cells"])[:, None]], axis=1)
        np.savez(path("colour"), x=have["colour"])
    return _unpack(have)


def _unpack(have: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v for k, v in have.items() if k != "colour"}
    c = have["colour"]
    out["colour_field"], out["colour_cells"], out["n_cells"] = c[:, :27], c[:, 27:54], c[:, 54]
    return out


def subject_bootstrap_auc(y, score, subjects, n_boot=2000, seed=0):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    subjects = np.asarray(subjects)
    by_class = {c: sorted(set(subjects[y == c])) for c in (0, 1)}
    index = {s: np.flatnonzero(subjects == s) for s in set(subjects)}
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([index[s] for c in (0, 1)
                              for s in rng.choice(by_class[c], len(by_class[c]))])
        vals.append(roc_auc_score(y[idx], score[idx]))
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def head():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))


def evaluate_variant(name, X, y, groups, split, ext, ext_y, ext_subj):
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    from featsvm.evaluation.ood import OODFlag

    tv = np.isin(split, ["train", "val"])
    cvp = cross_val_predict(head(), X[tv], y[tv], groups=groups[tv],
                            cv=StratifiedGroupKFold(5, shuffle=True, random_state=0))
    cv_acc = float((cvp == y[tv]).mean())
    tr, va, te = split == "train", split == "val", split == "test"
    model = head().fit(X[tr], y[tr])
    test_acc = float((model.predict(X[te]) == y[te]).mean())
    res = {"variant": name, "cv_accuracy": cv_acc, "test_accuracy": test_acc}
    proba = model.predict_proba(ext)
    benign = list(model.classes_).index("benign")
    p_mal = 1.0 - proba[:, benign]
    called_mal = proba.argmax(axis=1) != benign
    res["ext_auc"] = float(roc_auc_score(ext_y, p_mal))
    res["ext_auc_ci"] = subject_bootstrap_auc(ext_y, p_mal, ext_subj)
    res["ext_benign_called_malignant"] = float(called_mal[ext_y == 0].mean())
    res["ext_malignant_called_malignant"] = float(called_mal[ext_y == 1].mean())
    flag = OODFlag().fit(X[tr]).calibrate(X[va])
    res["ood_test_rate"] = float(flag.flag(X[te]).mean())
    res["ood_ext_rate"] = float(flag.flag(ext).mean())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--external", required=True, help="NAME=FOLDER (all/ and hem/ inside)")
    ap.add_argument("--backbone", default="alexnet")
    ap.add_argument("--weights-dir", default=None)
    ap.add_argument("--work", default="/work/cache/transfer")
    ap.add_argument("--variants", default="cells,cells+reinhard,field,cells+grey")
    ap.add_argument("--cell-size", type=int, default=112,
                    help="pixels of a cell crop (the cell spans 80 %% of it)")
    ap.add_argument("--max-cells", type=int, default=4,
                    help="largest cells pooled per field (bounds the CPU time)")
    ap.add_argument("--reference-images", type=int, default=300,
                    help="train images whose cell crops form the Reinhard reference")
    ap.add_argument("--field-cache", default=None,
                    help="featsvm cache of the same backbone (field view) to take the Taleqani "
                    "field embeddings from instead of recomputing them")
    ap.add_argument("--limit", type=int, default=0, help="smoke test: every k-th image only")
    ap.add_argument("--lab-every", type=int, default=1,
                    help="use every k-th Taleqani image (CPU budget; the external set is whole)")
    args = ap.parse_args()

    from PIL import Image

    from featsvm.data.manifest import read_manifest
    from featsvm.features import stain
    from featsvm.features.cells import cell_crops

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    variants = tuple(args.variants.split(","))
    man = read_manifest(args.split)
    rows = list(man.rows)
    root = Path(args.data)
    ext_name, ext_dir = args.external.split("=", 1)
    ext_rows = list_external(Path(ext_dir))
    if args.limit:
        rows, ext_rows = rows[::args.limit], ext_rows[::args.limit]
        work = work / f"limit{args.limit}"
        work.mkdir(parents=True, exist_ok=True)
    rows = rows[::args.lab_every]

    # Reinhard reference from Taleqani TRAIN cell crops (every k-th train image)
    ref_path = work / "reinhard-reference.json"
    if ref_path.is_file():
        reference = stain.LabStats.from_list(json.loads(ref_path.read_text())["lab"])
    else:
        train = [r for r in rows if r.split == "train"]
        step = max(1, len(train) // args.reference_images)
        crops = [c for r in train[::step]
                 for c in cell_crops(Image.open(root / r.relpath).convert("RGB"), size=96)]
        reference = stain.reference_from_images(crops)
        ref_path.write_text(json.dumps({"lab": reference.to_list(), "n_crops": len(crops),
                                        "from": f"every {step}th train image of {args.split}"}))
    print(f"Reinhard reference (Lab mean, std): {reference.to_list()}")

    emb = Embedder(args.backbone, args.weights_dir)
    tag = f"{args.backbone}-{man.sha256[:8]}-c{args.cell_size}-m{args.max_cells}-e{args.lab_every}"
    t0 = time.perf_counter()
    field_npz = work / f"{tag}-taleqani-field.npz"
    if args.field_cache and "field" in variants and not field_npz.is_file():
        from featsvm.features.cache import read_cache

        cached = read_cache(args.field_cache)
        if cached.attrs["preprocessing"] != emb.loaded.preprocessing.to_json():
            raise SystemExit(f"{args.field_cache}: preprocessing differs from {args.backbone}'s")
        np.savez(field_npz, x=cached.lookup([r.sha256 for r in rows]))
    lab = embed_all([root / r.relpath for r in rows], emb, reference, work, f"{tag}-taleqani",
                    variants, args.cell_size, args.max_cells)
    ext = embed_all([Path(ext_dir) / r[0] for r in ext_rows], emb, reference, work,
                    f"{tag}-{ext_name}", variants, args.cell_size, args.max_cells)
    print(f"embeddings ready in {time.perf_counter() - t0:.0f} s")
    no_cell = [r.relpath for r, n in zip(rows, lab["n_cells"], strict=True) if n == 0]
    print(f"fields with no cell found: {len(no_cell)} of {len(rows)} (whole field used): "
          f"{no_cell[:10]}{' ...' if len(no_cell) > 10 else ''}")
    y = np.array([r.label for r in rows])
    groups = np.array([r.group for r in rows])
    split = np.array([r.split for r in rows])
    ext_y = np.array([r[1] for r in ext_rows])
    ext_subj = np.array([r[2] for r in ext_rows])
    results = []
    table = [(v, v) for v in variants] + [("colour_stats(field)", "colour_field"),
                                          ("colour_stats(cells)", "colour_cells")]
    for name, key in table:
        res = evaluate_variant(name, lab[key], y, groups, split, ext[key], ext_y, ext_subj)
        results.append(res)
        lo, hi = res["ext_auc_ci"]
        print(f"{name:<22} CV {100 * res['cv_accuracy']:.1f}  "
              f"test {100 * res['test_accuracy']:.1f}  {ext_name} AUC {res['ext_auc']:.3f} "
              f"[{lo:.2f}, {hi:.2f}]  "
              f"benign->malig {100 * res['ext_benign_called_malignant']:.0f} %"
              f"  OOD test {100 * res['ood_test_rate']:.1f} % {ext_name} "
              f"{100 * res['ood_ext_rate']:.1f} %", flush=True)
    out = REPO / "benchmarks" / "results" / f"transfer-{args.backbone}.json"
    out.write_text(json.dumps({
        "backbone": args.backbone, "split_sha256": man.sha256, "external": ext_name,
        "n_lab": len(rows), "lab_every": args.lab_every, "cell_size": args.cell_size,
        "max_cells": args.max_cells, "n_external": len(ext_rows), "fields_without_cell": no_cell,
        "reinhard_reference": reference.to_list(), "results": results,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
