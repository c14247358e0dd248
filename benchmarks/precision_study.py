"""Does `--precision auto` change the study's conclusions? (a script, not a test)

Compares two finished studies of the same config and split, one made with fp32 features and
one with ``precision = "auto"`` (bf16 for the backbones whose spec allows it, on a CPU with
native bf16):

* **features**: for every backbone with both an fp32 and a bf16 cache, the cosine similarity
  of each image's two embeddings (rows matched by sha256): min, 1st percentile, median;
  the issue asks >= 0.999;
* **heads**: for every run of the fp32 study (head fits: test split; pooled CVs: all images;
  external sets: ROC-AUC), the same run of the auto study and whether each one's accuracy
  (ROC-AUC) lies inside the other's 95 % CI;
* **time**: the wall time of each study step, from the studies' logs when given.

Usage::

    python benchmarks/precision_study.py --fp32 /work/study-after --auto /work/study-auto \
        --out benchmarks/results/precision_study

Writes ``<out>.json`` and ``<out>.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cache_pairs(fp32_dir: Path, auto_dir: Path) -> list[tuple[str, Path, Path]]:
    """(backbone-layer, fp32 cache, bf16 cache) for each backbone cached both ways."""
    out = []
    for bf in sorted(auto_dir.glob("*-bf16-*.h5")):
        stem = bf.name.split("-bf16-")[0]
        fp = sorted(fp32_dir.glob(f"{stem}-fp32-*.h5"))
        if fp:
            out.append((stem, fp[0], bf))
    return out


def cosine_parity(fp32: Path, bf16: Path) -> dict[str, Any]:
    from featsvm.features.cache import read_cache

    a, b = read_cache(fp32), read_cache(bf16)
    idx = {s: i for i, s in enumerate(a.sha256)}
    pairs = [(idx[s], j) for j, s in enumerate(b.sha256) if s in idx]
    x = a.features[[i for i, _ in pairs]].astype(np.float64)
    y = b.features[[j for _, j in pairs]].astype(np.float64)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
    return {"fp32_cache": fp32.name, "bf16_cache": bf16.name, "n": len(pairs),
            "cosine_min": float(cos.min()), "cosine_p1": float(np.percentile(cos, 1)),
            "cosine_median": float(np.median(cos)),
            "share_below_0.999": float((cos < 0.999).mean())}


def _run_key(cfg: dict[str, Any]) -> str:
    return f"{cfg.get('model')} ({cfg.get('kind')})"


def runs(study: Path) -> dict[str, dict[str, Any]]:
    """Headline numbers of every run of a study: key -> {accuracy, ci, external AUCs, run}."""
    out: dict[str, dict[str, Any]] = {}
    for cfg_path in sorted((study / "runs").glob("*/config.json")):
        run = cfg_path.parent
        cfg = json.loads(cfg_path.read_text())
        m_path = run / "metrics.json"
        if not m_path.is_file():
            continue
        m = json.loads(m_path.read_text())
        block = m.get("pooled") or m.get("test")
        if not block:
            continue
        ext = {}
        for e in sorted((run / "external").glob("*/metrics.json")):
            em = json.loads(e.read_text())
            ext[e.parent.name] = {"roc_auc": em.get("roc_auc"),
                                  "ci": (em.get("ci95") or {}).get("roc_auc")}
        out[_run_key(cfg)] = {"run": run.name, "precision": (cfg.get("cache") or {}).get(
            "precision", cfg.get("precision")), "n": block["n"],
            "accuracy": block["accuracy"], "ci": block["ci95"]["accuracy"], "external": ext}
    return out


def inside(value: float | None, ci: list[float] | None) -> bool | None:
    if value is None or not ci:
        return None
    return bool(ci[0] - 1e-12 <= value <= ci[1] + 1e-12)


def compare_runs(fp32: dict[str, Any], auto: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(set(fp32) | set(auto)):
        a, b = fp32.get(key), auto.get(key)
        if a is None or b is None:
            rows.append({"run": key, "only_in": "fp32" if b is None else "auto"})
            continue
        row = {"run": key, "precision_auto": b["precision"], "n": b["n"],
               "fp32": a["accuracy"], "fp32_ci": a["ci"], "auto": b["accuracy"],
               "auto_ci": b["ci"],
               "within_cis": bool(inside(a["accuracy"], b["ci"])
                                  and inside(b["accuracy"], a["ci"]))}
        for name in sorted(set(a["external"]) & set(b["external"])):
            ea, eb = a["external"][name], b["external"][name]
            row[f"{name}_auc"] = [ea["roc_auc"], eb["roc_auc"]]
            row[f"{name}_within_cis"] = bool(inside(ea["roc_auc"], eb["ci"])
                                             and inside(eb["roc_auc"], ea["ci"]))
        rows.append(row)
    return rows


STEP = re.compile(r"^(done|skipped) (.+?): .*\(([\d.]+) s\)\s*$")


def step_times(log: Path) -> list[tuple[str, str, float]]:
    """(step, done|skipped, seconds) from a `featsvm run` log."""
    if not log.is_file():
        return []
    text = log.read_text(errors="replace").replace("\r", "\n")
    return [(m.group(2), m.group(1), float(m.group(3)))
            for line in text.splitlines() if (m := STEP.match(line.strip()))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", type=Path, required=True, help="study folder made with fp32")
    ap.add_argument("--auto", type=Path, required=True, help="study folder made with auto")
    ap.add_argument("--fp32-cache", type=Path, help="default: <fp32>/cache")
    ap.add_argument("--auto-log", type=Path, help="default: <auto>/study.log")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/precision_study")
    args = ap.parse_args()

    feats = {stem: cosine_parity(fp, bf) for stem, fp, bf in
             cache_pairs(args.fp32_cache or args.fp32 / "cache", args.auto / "cache")}
    rows = compare_runs(runs(args.fp32), runs(args.auto))
    steps = step_times(args.auto_log or args.auto / "study.log")
    result = {"features": feats, "runs": rows,
              "auto_study_steps": [{"step": s, "outcome": o, "seconds": t}
                                   for s, o, t in steps],
              "auto_study_seconds": round(sum(t for _, _, t in steps), 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    md = ["# --precision auto vs fp32: the same study twice", "",
          "`python benchmarks/precision_study.py --fp32 FP32_STUDY --auto AUTO_STUDY`", "",
          "## Features (bf16 vs fp32 cache, every image)", "",
          "| backbone | n | cosine min | p1 | median | share < 0.999 |",
          "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {k} | {v['n']} | {v['cosine_min']:.5f} | {v['cosine_p1']:.5f} | "
           f"{v['cosine_median']:.5f} | {100 * v['share_below_0.999']:.1f} % |"
           for k, v in feats.items()]
    md += ["", "## Runs (accuracy %: head fits on the test split, pooled CVs on all images)", "",
           "| run | auto precision | fp32 [95 % CI] | auto [95 % CI] | each inside the other's CI "
           "| C-NMC ROC-AUC fp32 / auto |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "only_in" in r:
            md.append(f"| {r['run']} | only in the {r['only_in']} study | | | | |")
            continue
        auc = r.get("cnmc-2019-sample_auc")
        auc_s = (f"{auc[0]:.3f} / {auc[1]:.3f} (inside each other's CI: "
                 f"{'yes' if r['cnmc-2019-sample_within_cis'] else 'NO'})"
                 if auc and None not in auc else "")
        md.append(f"| {r['run']} | {r['precision_auto']} | {100 * r['fp32']:.2f} "
                  f"[{100 * r['fp32_ci'][0]:.1f}, {100 * r['fp32_ci'][1]:.1f}] | "
                  f"{100 * r['auto']:.2f} [{100 * r['auto_ci'][0]:.1f}, "
                  f"{100 * r['auto_ci'][1]:.1f}] | {'yes' if r['within_cis'] else 'NO'} | "
                  f"{auc_s} |")
    if steps:
        md += ["", f"## Steps of the auto study ({result['auto_study_seconds'] / 60:.1f} min "
               "summed)", "", "| step | | s |", "|---|---|---:|"]
        md += [f"| {s} | {o} | {t:.1f} |" for s, o, t in steps]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
