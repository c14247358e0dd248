"""`featsvm ensemble`: a soft-vote ensemble of finished runs, recorded as a run of its own.

The ensemble's class probabilities for an image are the **unweighted mean of its members'
class probabilities** (each member's own, after its own calibration); its predicted label is
their arg-max. Nothing is fitted: no weights, no stacking, no map on top.

Members are existing run folders, either

* all **cross-validation** runs (kind ``cv``): the ensemble is scored on the pooled
  out-of-fold predictions with the very code a CV run is scored with
  (`featsvm.models.cv.pooled_metrics`: pooled block with group-bootstrap CIs, every fold's
  block and the spread over folds). Every image must be in the **same fold** in every member:
  then each fold's ensemble is the members' models of that fold, all trained on the same
  training part, and the pooled result is a K-fold CV of the ensemble (same manifest,
  ``--folds`` and seed give that). Like a CV run, it keeps no deployable model.
* all **deployable** runs (kinds ``head`` / ``end_to_end``, mixable): scored on the val and
  test rows as `featsvm fit` scores a head (`featsvm.evaluation.metrics.score_predictions`),
  with the calibration and abstention blocks of `featsvm.evaluation.trust.run_blocks`: the
  abstention threshold is chosen on the **ensemble's own val probabilities**
  (`featsvm.evaluation.selective`). `featsvm predict` / `evaluate` load the members and average
  their probabilities; an image is flagged out of distribution when **any** member that has
  a flag flags it (`any_member_flags`: a conservative rule, a warning from either model is
  worth showing).

The members must have scored the same images (matched by path and sha256: byte-identical
files at two paths stay two rows) of the same split manifest; the first image that differs
is named. The record (kind ``ensemble``) has the usual files;
its "model file" is ``members.json``: every member's folder, run id, kind, model name and the
sha256 of its config.json and model file. Loading an ensemble refuses a member whose files no
longer match those sha256s.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from featsvm.data.manifest import Manifest, ManifestRow, read_manifest
from featsvm.errors import EnsembleError, MissingInputError
from featsvm.evaluation.metrics import score_predictions
from featsvm.evaluation.selective import TARGET_ERROR
from featsvm.evaluation.trust import run_blocks
from featsvm.fileio import sha256_file, write_json_atomic
from featsvm.models.cv import POOLED, pooled_metrics
from featsvm.runs import (
    CONFIG_FILE,
    Predictions,
    RunRecord,
    finish_run,
    new_run_dir,
    now_iso,
    read_run,
    verify_model,
    versions,
    write_sidecar,
)

logger = logging.getLogger(__name__)

KIND = "ensemble"
MEMBERS_FILE = "members.json"
COMBINE = "mean of class probabilities"
CV, DEPLOYABLE = "cv", "deployable"  # config.json members_kind
DEPLOYABLE_KINDS = ("head", "end_to_end")
OOD_RULE = ("flagged when any member that has an out-of-distribution flag flags it "
            "(conservative: a warning from either model is worth showing)")


# ---------------------------------------------------------------- members


def resolve_run(run: str | os.PathLike[str], runs_dir: str | os.PathLike[str]) -> Path:
    """A member given as a run folder, or as a run id under `runs_dir`."""
    p = Path(run)
    if p.is_dir():
        return p
    if (Path(runs_dir) / p).is_dir():
        return Path(runs_dir) / p
    raise MissingInputError(f"run {run} not found (neither a folder nor a run id under "
                            f"{runs_dir})")


def member_entry(record: RunRecord) -> dict[str, Any]:
    """What members.json and config.json record about one member (checks its model file)."""
    c = record.config
    return {
        "path": str(record.path.resolve()),
        "run_id": record.run_id,
        "kind": c.get("kind"),
        "model": c.get("model"),
        "backbone": c.get("backbone"),
        "head": c.get("head"),
        "weights": c.get("weights"),
        "layer": (c.get("preprocessing") or {}).get("layer"),
        "view": (c.get("preprocessing") or {}).get("view") or "field",
        "config_sha256": sha256_file(record.path / CONFIG_FILE),
        "model_file": c.get("model_file"),
        "model_sha256": verify_model(record),
        "has_ood_flag": bool((c.get("ood") or {}).get("file")),
    }


def members_kind(records: Sequence[RunRecord]) -> str:
    """``cv`` or ``deployable``; refuses fewer than two distinct runs, ensembles of
    ensembles, a mix of cv and deployable runs, and different split manifests."""
    if len(records) < 2:
        raise EnsembleError("an ensemble needs at least two runs")
    ids = [r.path.resolve() for r in records]
    for i, p in enumerate(ids):
        if p in ids[:i]:
            raise EnsembleError(f"run {records[i].path} is given twice")
    kinds = [r.config.get("kind") for r in records]
    for r, k in zip(records, kinds, strict=True):
        if k == KIND:
            raise EnsembleError(f"{r.path} is itself an ensemble: give its members instead")
    if all(k == "cv" for k in kinds):
        which = CV
    elif all(k in DEPLOYABLE_KINDS for k in kinds):
        which = DEPLOYABLE
    else:
        listed = ", ".join(f"{r.run_id} ({k})" for r, k in zip(records, kinds, strict=True))
        raise EnsembleError(
            f"cannot combine {listed}: members are either all cross-validation runs (kind "
            "cv: pooled out-of-fold predictions) or all deployable runs (head / end_to_end: "
            "val and test of one split); their predictions are not of the same images")
    first = records[0]
    want = first.config.get("split") or {}
    for r in records[1:]:
        got = r.config.get("split") or {}
        if got.get("sha256") != want.get("sha256"):
            raise EnsembleError(
                f"{r.run_id} was scored on split manifest {got.get('path')} (sha256 "
                f"{str(got.get('sha256'))[:12]}…), {first.run_id} on {want.get('path')} "
                f"(sha256 {str(want.get('sha256'))[:12]}…): members must come from the same "
                "split manifest")
    return which


def _keys(p: Predictions) -> list[tuple[str, str]]:
    """(relpath, sha256) of every row: byte-identical files of a release (the same sha256 at
    two paths, possibly with different labels) stay two rows."""
    return list(zip(p.relpath, p.sha256, strict=True))


def _first_difference(a: RunRecord, pa: Predictions, b: RunRecord, pb: Predictions) -> str:
    """The first image scored by one member and not by the other, as a sentence ("" when
    they score the same images)."""
    for (x, px), (y, py) in (((a, pa), (b, pb)), ((b, pb), (a, pa))):
        seen = set(_keys(py))
        for rel, sha in _keys(px):
            if (rel, sha) not in seen:
                return (f"image {rel} (sha256 {sha[:12]}…) is scored by {x.run_id} but not "
                        f"by {y.run_id}")
    return ""


def aligned_probabilities(records: Sequence[RunRecord], cv: bool
                          ) -> tuple[Predictions, list[np.ndarray]]:
    """The first member's predictions (their row order is the ensemble's) and every member's
    probabilities in that order, matched by image path and sha256. Refuses members that did
    not score the same images in the same split, and (`cv`) images held out in different
    folds."""
    first = records[0]
    base = first.predictions()
    probas = [base.proba]
    for r in records[1:]:
        p = r.predictions()
        diff = _first_difference(first, base, r, p)
        if diff:
            raise EnsembleError(f"the members did not score the same images: {diff}")
        at = {key: j for j, key in enumerate(_keys(p))}
        order = np.array([at[key] for key in _keys(base)], dtype=np.int64)
        for i, j in enumerate(order):
            if p.split[j] != base.split[i]:
                raise EnsembleError(
                    f"image {base.relpath[i]} is in split {base.split[i]} of {first.run_id} "
                    f"but {p.split[j]} of {r.run_id}")
            if cv and (p.fold is None or base.fold is None or p.fold[j] != base.fold[i]):
                raise EnsembleError(
                    f"the members' folds differ: image {base.relpath[i]} is in fold "
                    f"{None if base.fold is None else base.fold[i]} of {first.run_id} but "
                    f"{None if p.fold is None else p.fold[j]} of {r.run_id}. A cross-validated "
                    "ensemble must be scored fold by fold with members trained on the same "
                    "training part, else its out-of-fold predictions mix partitions and are "
                    "no K-fold CV of the ensemble; run the members' `featsvm cv` with the "
                    "same manifest, --folds and seed")
        probas.append(p.proba[order])
    return base, probas


def mean_probabilities(probas: Sequence[np.ndarray]) -> np.ndarray:
    """The soft vote: the unweighted mean of the members' class probabilities."""
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in probas]), axis=0)


def any_member_flags(flags: Sequence[Sequence[bool | None]]) -> list[bool | None]:
    """The ensemble's OOD flag per image from its members' (one sequence per member, None
    where a member has no flag): True when any member that has a flag flags the image; None
    when no member has one."""
    out: list[bool | None] = []
    for per_image in zip(*flags, strict=True):
        known = [bool(f) for f in per_image if f is not None]
        out.append(any(known) if known else None)
    return out


# ---------------------------------------------------------------- the manifest


def locate_manifest(records: Sequence[RunRecord], runs_dir: Path) -> Manifest:
    """The members' split manifest (labels and duplicate groups for the metrics): at its
    recorded path, or that path relative to the runs folder's parent or a member's runs
    folder's parent, with the recorded sha256."""
    split = records[0].config.get("split") or {}
    path, want = str(split.get("path") or ""), split.get("sha256")
    candidates = [Path(path), runs_dir.parent / path,
                  *(r.path.resolve().parent.parent / path for r in records)]
    for cand in candidates:
        if path and cand.is_file() and sha256_file(cand) == want:
            return read_manifest(cand)
    raise MissingInputError(
        f"the members' split manifest {path or '?'} (sha256 {str(want)[:12]}…) is not here "
        "(or changed): run featsvm ensemble where it is, from the folder the runs were made in")


def _manifest_rows(manifest: Manifest, base: Predictions) -> list[ManifestRow]:
    by_key = {(r.relpath, r.sha256): r for r in manifest.rows}
    missing = [rel for rel, sha in _keys(base) if (rel, sha) not in by_key]
    if missing:
        raise EnsembleError(f"image {missing[0]} of the members' predictions is not in the "
                            f"split manifest {manifest.path}")
    return [by_key[key] for key in _keys(base)]


# ---------------------------------------------------------------- scoring


def _bootstrap(record: RunRecord, block: str) -> tuple[int, int]:
    """(n_boot, seed) the member's own metrics used."""
    b = (record.metrics.get(block) or {}).get("bootstrap") or {}
    return int(b.get("n_boot", 1000)), int(b.get("seed", 0))


def _target_error(records: Sequence[RunRecord], target_error: float | None) -> float:
    if target_error is not None:
        return float(target_error)
    found = {(r.config.get("abstention") or {}).get("target_error") for r in records}
    found.discard(None)
    return float(found.pop()) if len(found) == 1 else TARGET_ERROR


def score_cv(records: Sequence[RunRecord], rows: Sequence[ManifestRow], proba: np.ndarray,
             fold: Sequence[int]) -> dict[str, Any]:
    """metrics.json of a cross-validated ensemble (`pooled_metrics`, as a CV run's); each
    fold's entry lists what its members recorded for that fold."""
    n_boot, seed = _bootstrap(records[0], POOLED)
    extras: dict[int, dict[str, Any]] = {}
    for k in sorted(set(int(f) for f in fold)):
        extras[k] = {"members": {
            r.run_id: {key: f.get(key) for key in ("best_params", "inner_cv_score", "n_fit",
                                                   "n_calibration", "seconds")}
            for r in records for f in r.metrics.get("folds") or [] if f.get("fold") == k}}
    return pooled_metrics([r.label for r in rows], [r.group for r in rows], proba, fold,
                          extras, n_boot=n_boot, seed=seed)


def score_deployable(records: Sequence[RunRecord], manifest: Manifest,
                     rows: Sequence[ManifestRow], proba: np.ndarray, target_error: float
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics.json, config abstention block) of an ensemble of deployable runs: val and
    test blocks as `featsvm fit` scores them, calibration and abstention blocks with the
    threshold chosen on the ensemble's own val probabilities."""
    n_boot, seed = _bootstrap(records[0], "test")
    metrics = score_predictions(manifest, list(rows), proba, n_boot=n_boot, seed=seed)

    def part(split: str) -> tuple[list[str], None, np.ndarray, list[int]]:
        idx = [i for i, r in enumerate(rows) if r.split == split]
        return ([rows[i].label for i in idx], None, proba[idx], [rows[i].group for i in idx])

    metrics["calibration"], metrics["selective"], abstention = run_blocks(
        part("val"), part("test"), None, "none", target_error=target_error, n_boot=n_boot,
        seed=seed)
    metrics["calibration"]["note"] = ("the mean of the members' probabilities (each after its "
                                      "own calibration); no map fitted on top")
    return metrics, abstention


# ---------------------------------------------------------------- the run record


@dataclass(frozen=True)
class _Combined:
    records: list[RunRecord]
    which: str
    manifest: Manifest
    rows: list[ManifestRow]
    proba: np.ndarray
    fold: list[int] | None


def combine(records: Sequence[RunRecord], runs_dir: Path) -> _Combined:
    """Check the members and average their probabilities (no files written)."""
    records = list(records)
    which = members_kind(records)
    base, probas = aligned_probabilities(records, cv=which == CV)
    manifest = locate_manifest(records, runs_dir)
    rows = _manifest_rows(manifest, base)
    if which == CV:
        rows = [replace(r, split=POOLED) for r in rows]
    return _Combined(records, which, manifest, rows, mean_probabilities(probas),
                     None if which != CV else [int(f) for f in base.fold or []])


def model_name(records: Sequence[RunRecord]) -> str:
    """e.g. ``ensemble(inception_v3<cells> + logreg, efficientnet_lite0<cells> + logreg)``."""
    return f"{KIND}({', '.join(str(r.config.get('model') or r.run_id) for r in records)})"


def make_ensemble(
    runs: Sequence[str | os.PathLike[str]],
    runs_dir: str | os.PathLike[str] = "runs",
    name: str | None = None,
    target_error: float | None = None,
) -> RunRecord:
    """Combine the runs `runs` (folders, or run ids under `runs_dir`) into a soft-vote
    ensemble and write its run record under `runs_dir` (module docstring). `target_error`:
    the abstention threshold's target on val (deployable members; default: the members'
    common one, else 1 %)."""
    t0 = time.perf_counter()
    runs_dir = Path(runs_dir)
    records = [read_run(resolve_run(r, runs_dir)) for r in runs]
    c = combine(records, runs_dir)
    entries = [member_entry(r) for r in records]
    if c.which == CV:
        metrics, abstention = score_cv(records, c.rows, c.proba, c.fold or []), None
    else:
        metrics, abstention = score_deployable(records, c.manifest, c.rows, c.proba,
                                               _target_error(records, target_error))
    run_dir = new_run_dir(runs_dir, name or KIND)
    write_json_atomic(run_dir / MEMBERS_FILE, {"combine": COMBINE, "members": entries})
    members_sha = write_sidecar(run_dir / MEMBERS_FILE)
    config = _run_config(run_dir, c, entries, members_sha, abstention, time.perf_counter() - t0)
    record = finish_run(run_dir, config, metrics, c.rows, c.proba, folds=c.fold)
    logger.info("run record: %s", run_dir)
    return record


def _run_config(run_dir: Path, c: _Combined, entries: list[dict[str, Any]], members_sha: str,
                abstention: dict[str, Any] | None, seconds: float) -> dict[str, Any]:
    """config.json of an ensemble run."""
    first = c.records[0].config
    fits = [(r.config.get("timing") or {}).get("fit_seconds") for r in c.records]
    block = POOLED if c.which == CV else "test"
    n_boot, seed = _bootstrap(c.records[0], block)
    config: dict[str, Any] = {
        "run_id": run_dir.name,
        "kind": KIND,
        "members_kind": c.which,
        "model": model_name(c.records),
        "backbone": None,
        "head": None,
        "weights": {"label": "the members' own (see members)", "sha256": None},
        "preprocessing": {},  # each member's own (see members)
        "split": {"path": str(c.manifest.path), "sha256": c.manifest.sha256,
                  "n": {s: sum(r.split == s for r in c.rows)
                        for s in sorted({r.split for r in c.rows})}},
        "seed": first.get("seed"),
        "model_file": MEMBERS_FILE,
        "model_sha256": members_sha,
        "combine": COMBINE,
        "members": entries,
        "timing": {"fit_seconds": None if None in fits else float(sum(fits)),
                   "fit_seconds_note": "the members' fit_seconds summed",
                   "combine_seconds": seconds},
        "versions": versions(),
        "created": now_iso(),
        "calibration": {"method": "none", "temperature": None, "fitted_on": None,
                        "note": "the mean of the members' probabilities, each after its own "
                                "calibration; nothing fitted on top"},
        "bootstrap": {"n_boot": n_boot, "seed": seed, "unit": "duplicate group"},
    }
    if c.which == CV:
        config["cv"] = {"folds": len(set(c.fold or [])),
                        "splitter": "the members' (every image in the same fold in every "
                                    "member, checked)"}
        return config
    flagged = [e["run_id"] for e in entries if e["has_ood_flag"]]
    config["abstention"] = abstention
    config["ood"] = ({"rule": OOD_RULE, "members": flagged, "threshold": None,
                      "threshold_from": "each member's own val split", "rate_test": None}
                     if flagged else None)
    return config


# ---------------------------------------------------------------- loading


def member_records(record: RunRecord) -> list[RunRecord]:
    """The members of an ensemble run, each checked against the sha256 of its config.json and
    model file that the ensemble recorded. A member is looked for at its recorded path, then
    next to the ensemble (the runs folder moved)."""
    out: list[RunRecord] = []
    for e in record.config.get("members") or []:
        recorded = Path(str(e.get("path") or ""))
        candidates = [recorded, record.path.parent / str(e.get("run_id"))]
        found = next((p for p in candidates if (p / CONFIG_FILE).is_file()), None)
        if found is None:
            raise MissingInputError(
                f"{record.path}: member run {e.get('run_id')} not found at {recorded} nor "
                f"next to the ensemble; the ensemble needs its members' run folders")
        if sha256_file(found / CONFIG_FILE) != e.get("config_sha256"):
            raise EnsembleError(
                f"{record.path}: member {found} has another config.json than the one the "
                "ensemble was made with (sha256 differs): rebuild the ensemble")
        member = read_run(found)
        if verify_model(member) != e.get("model_sha256"):
            raise EnsembleError(
                f"{record.path}: member {found}'s model file differs from the one the "
                "ensemble was made with (sha256 differs): rebuild the ensemble")
        out.append(member)
    if len(out) < 2:
        raise EnsembleError(f"{record.path}: config.json lists {len(out)} member(s)")
    return out
