"""Speed of the SVM head's grid search on ~2,600 x 4,096 features (issue target: <= 2 min).

Synthetic features stand in for a 4,096-d cache (VGG16 fc7 size; the shared VGG16 file has no
classifier, so its real features are 512-d): four Gaussian classes in the dataset's class
proportions, non-negative like ReLU outputs, overlapping (``--sep``, default 0.08: held-out
balanced accuracy about 0.95, like the real embeddings' CV scores) so that the SVMs keep most
rows as support vectors, the slow case. The full default grid of configs/heads.toml is run
exactly as `featsvm fit` runs it (grouped 5-fold CV on every core, refit), then, for
reference, one plain ``sklearn.svm.SVC`` fit of the same size.

    .venv/bin/python benchmarks/fit_speed.py [--n 2600] [--dim 4096] [--sep 0.08] [--no-reference]

Prints the figures and writes benchmarks/results/fit_speed.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featsvm.fileio import write_json_atomic  # noqa: E402
from featsvm.labels import LABELS  # noqa: E402
from featsvm.models.heads import HeadConfig, fit_head, load_head_config, param_grid  # noqa: E402
from featsvm.runs import now_iso, versions  # noqa: E402

TARGET_SECONDS = 120.0
# class shares of the 3,256-image release (benign, early, pre, pro)
SHARES = np.array([504, 985, 963, 804], dtype=float) / 3256


def synthetic(
    n: int, dim: int, sep: float = 0.08, seed: int = 0
) -> tuple[np.ndarray, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(len(LABELS), size=n, p=SHARES)
    centres = rng.normal(0.0, 1.0, (len(LABELS), dim)).astype(np.float32)
    X = np.maximum(sep * centres[y] + rng.normal(0.0, 1.0, (n, dim)).astype(np.float32), 0.0)
    groups = np.arange(n) // 2  # duplicate pairs, as in the real data
    return X, [LABELS[i] for i in y], groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2600)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--sep", type=float, default=0.08,
                    help="class separation (smaller = harder, more support vectors)")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "heads.toml")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the single stock sklearn SVC fit")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fit_speed.json")
    args = ap.parse_args()

    cfg: HeadConfig = load_head_config(args.config)
    X, y, groups = synthetic(args.n, args.dim, args.sep)
    n_candidates = sum(int(np.prod([len(v) for v in g.values()])) for g in param_grid("svm", cfg))
    print(f"SVM grid: {n_candidates} candidates x {cfg.cv_folds} folds on {args.n} x {args.dim} "
          f"features, n_jobs={cfg.n_jobs} ({os.cpu_count()} cores), load {os.getloadavg()}")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    fitted = fit_head(X, y, groups, "svm", cfg)
    grid_seconds = time.perf_counter() - t0
    n_sv = int(fitted.estimator.named_steps["clf"].n_support_.sum())
    print(f"grid search + refit: {grid_seconds:.1f} s (target <= {TARGET_SECONDS:.0f} s), "
          f"{n_sv} support vectors; best {fitted.best_params}, "
          f"CV {cfg.scoring} {fitted.cv_best_score:.4f}")

    reference: dict[str, float] | None = None
    if not args.no_reference:
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        Xs = StandardScaler().fit_transform(X[: int(args.n * (cfg.cv_folds - 1) / cfg.cv_folds)])
        ys = y[: len(Xs)]
        t1 = time.perf_counter()
        SVC(kernel="rbf", C=1.0, gamma="scale").fit(Xs, ys)
        ref = time.perf_counter() - t1
        t2 = time.perf_counter()
        from featsvm.models.heads import KernelSVC

        KernelSVC(kernel="rbf", C=1.0, gamma="scale").fit(Xs, ys)
        ours = time.perf_counter() - t2
        reference = {"n_rows": len(Xs), "sklearn_svc_rbf_one_fit_seconds": ref,
                     "kernel_svc_rbf_one_fit_seconds": ours}
        print(f"one RBF fit on {len(Xs)} rows: sklearn SVC {ref:.1f} s, KernelSVC {ours:.1f} s")

    try:
        import subprocess

        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    result = {
        "benchmark": "fit_speed",
        "created": now_iso(),
        "git_commit": commit,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": versions(),
        "data": {"kind": "synthetic non-negative Gaussian classes", "n": args.n,
                 "dim": args.dim, "sep": args.sep, "seed": 0},
        "n_support_vectors_refit": int(fitted.estimator.named_steps["clf"].n_support_.sum()),
        "config": str(args.config),
        "n_candidates": n_candidates,
        "cv_folds": cfg.cv_folds,
        "n_fits": n_candidates * cfg.cv_folds + 1,
        "grid_seconds": grid_seconds,
        "timing": fitted.timing,
        "best_params": fitted.best_params,
        "cv_best_score": fitted.cv_best_score,
        "target_seconds": TARGET_SECONDS,
        "target_met": grid_seconds <= TARGET_SECONDS,
        "reference": reference,
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
