"""Where the report's numbers come from: the weights each run used (flagging anything that is
not plain ImageNet), the split manifests and their counts, the settings each run chose, and the
library versions recorded in the runs. Plain data for the HTML sections
(`featsvm.evaluation.sections`); nothing here draws or writes files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from featsvm.fileio import sha256_file
from featsvm.labels import DISPLAY_NAMES, LABELS
from featsvm.runs import RunRecord

DATASET_NAME = "Acute Lymphoblastic Leukemia (ALL) image dataset (Kaggle, Taleqani)"
DATASET_DOI = "10.34740/KAGGLE/DSV/2175623"

# Weight files whose provenance the report must flag (sha256 -> what is not plain ImageNet).
KNOWN_NOT_IMAGENET: dict[str, str] = {
    "9705e7702949faae59bcbd61e11f337c245804e85ea8839d0e3139db680184f3": (
        "NOT plain ImageNet: nsfwjs InceptionV3; stem to Mixed_6c are 8-bit ImageNet weights, "
        "Mixed_6d onward (and so the 2048-d avgpool feature) were fine-tuned on NSFW images"
    ),
}


def _known_weights_note(backbone: str, sha256: str) -> str | None:
    """What featsvm.features.backbones knows about a weights file that is not plain ImageNet."""
    if sha256 in KNOWN_NOT_IMAGENET:
        return KNOWN_NOT_IMAGENET[sha256]
    try:
        from featsvm.features.backbones import get_spec

        known = get_spec(backbone).known_file(sha256)
    except Exception:  # noqa: BLE001 - unknown backbone name or no torch: nothing known
        return None
    if known is not None and known.not_imagenet_from:
        return f"NOT plain ImageNet from {known.not_imagenet_from} on: {known.note}"
    return None


def weight_provenance(runs: Sequence[RunRecord]) -> list[dict[str, str]]:
    """Distinct (backbone, weights) pairs with a note on anything that is not plain ImageNet,
    and the embedding layers the runs used (a layer below the non-ImageNet blocks is still an
    ImageNet feature)."""
    seen: dict[tuple[str, str, str], dict[str, str]] = {}
    layers: dict[tuple[str, str, str], set[str]] = {}
    # an ensemble's weights are its members' (config.json members: backbone, weights, layer)
    configs = [m for r in runs for m in (r.config.get("members") or [r.config])]
    for c in configs:
        w = c.get("weights") or {}
        key = (str(c.get("backbone") or c.get("model") or ""), str(w.get("label", "")),
               str(w.get("sha256") or ""))
        pre = c.get("preprocessing") or {}
        layer = (pre.get("layer") if isinstance(pre, dict) else None) or c.get("layer")
        layers.setdefault(key, set()).add(
            f"{layer} ({c.get('kind')})" if layer else str(c.get("kind")))
        if key in seen:
            continue
        label_l = key[1].lower()
        known = _known_weights_note(key[0], key[2]) if key[2] else None
        if known:
            note = known
        elif label_l == "random":
            note = "NOT pretrained: random initialisation"
        elif label_l == "none" or not c.get("backbone"):
            note = "trained from scratch (no pretrained weights)"
        elif "nsfw" in label_l or "another task" in label_l:
            note = "NOT plain ImageNet (see its label)"
        else:
            note = "ImageNet"
        seen[key] = {"backbone": key[0], "label": key[1], "sha256": key[2], "note": note}
    for key, entry in seen.items():
        entry["layers"] = ", ".join(sorted(layers[key]))
    return [seen[k] for k in sorted(seen)]


def split_protocol(runs: Sequence[RunRecord], runs_dir: Path) -> tuple[list[str], list[str]]:
    """Sentences describing every split manifest the runs were scored on (counts per split and
    class when the manifest is still readable and unchanged), and the manifests' sha256s."""
    from featsvm.data.manifest import read_manifest

    lines: list[str] = []
    shas: dict[str, str] = {}
    for r in runs:
        s = r.config.get("split") or {}
        shas.setdefault(str(s.get("sha256") or ""), str(s.get("path") or ""))
    for sha, path_s in sorted(shas.items()):
        used_by = sum(1 for r in runs if (r.config.get("split") or {}).get("sha256", "") == sha)
        head = f"manifest {path_s or '?'} (sha256 {sha[:16]}…), used by {used_by} run(s)"
        candidates = [Path(path_s), runs_dir.parent / path_s] if path_s else []
        found = None
        for cand in candidates:
            if cand.is_file() and sha256_file(cand) == sha:
                found = cand
                break
        if found is None:
            lines.append(head + ": the file is not available here (or changed), counts omitted")
            continue
        man = read_manifest(found)
        parts = []
        for split in ("train", "val", "test"):
            rows = man.subset(split)
            per = ", ".join(f"{DISPLAY_NAMES[lab]} {sum(x.label == lab for x in rows)}"
                            for lab in LABELS)
            parts.append(f"{split} {len(rows)} ({per})")
        groups = len({x.group for x in man.rows})
        folds = sorted({x.fold for x in man.rows if x.fold is not None})
        conflicts = sum(x.conflict for x in man.rows)
        lines.append(
            f"{head}: {len(man.rows)} images in {groups} duplicate groups; "
            + "; ".join(parts)
            + (f"; {len(folds)} grouped folds inside train" if folds else "")
            + (f"; {conflicts} images in label-conflicting groups" if conflicts else "")
        )
    return lines, sorted(shas)


def collect_versions(runs: Sequence[RunRecord]) -> dict[str, list[str]]:
    out: dict[str, set[str]] = {}
    for r in runs:
        for k, v in (r.config.get("versions") or {}).items():
            out.setdefault(str(k), set()).add(str(v))
    return {k: sorted(v) for k, v in sorted(out.items())}



def run_settings(c: dict[str, Any]) -> str:
    """The few settings a reader needs to judge a run: chosen hyper-parameters for a head,
    epochs / freezing for an end-to-end model."""
    parts: list[str] = []
    if isinstance(c.get("hyperparameters"), dict):
        parts += [f"{k}={v}" for k, v in sorted(c["hyperparameters"].items())]
    if (c.get("calibration") or {}).get("method") not in (None, "none"):
        parts.append(f"calibration={c['calibration']['method']}")
    for key in ("epochs_run", "best_epoch", "freeze_until", "stopped_early"):
        if c.get(key) not in (None, False):
            parts.append(f"{key}={c[key]}")
    return ", ".join(parts) or "–"
