"""Model files of head runs: skops, loaded without running code; old pickles only on request.

A head (`featsvm.models.heads.FittedHead` around a scikit-learn pipeline, possibly calibrated)
is saved with skops (``model.skops``, a zip of JSON and numpy arrays, maintained by the
scikit-learn developers); so is the OOD flag of a run (``ood.skops``, head and end-to-end
runs). Loading rebuilds only the types skops trusts by default (public scikit-learn
estimators, numpy, builtins) and the ones in TRUSTED_TYPES below; a file that names any
other type is refused (RunRecordError naming it), so a run folder someone sent you cannot
execute code when you load it. Add a new head or calibrator class to TRUSTED_TYPES, in this
one place.

Before loading, the file is checked against its sha256 sidecar *and* against the sha256 that
config.json records (`featsvm.runs.recorded_sha256`): whoever swaps the model must also edit
config.json. Runs written before this format hold a joblib pickle (``model.joblib``), which
runs code on load: they are refused unless the caller passes ``trust_pickle=True``
(``featsvm predict --trust-pickle``), for run folders you made yourself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from featsvm.errors import RunRecordError
from featsvm.fileio import atomic_path
from featsvm.runs import RunRecord, recorded_sha256, verify_sidecar, write_sidecar

MODEL_FILE = "model.skops"
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")

# Types a head file may hold beyond skops' defaults (which cover public scikit-learn
# estimators such as Pipeline, StandardScaler, PCA, LogisticRegression, SVC,
# CalibratedClassifierCV, FrozenEstimator, IsotonicRegression, and numpy arrays).
TRUSTED_TYPES: tuple[str, ...] = (
    "featsvm.evaluation.ood.OODFlag",
    "featsvm.models.heads.FittedHead",
    "featsvm.models.heads.KernelSVC",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._TemperatureScaling",
    "sklearn.calibration._SigmoidCalibration",
)


def save_model(run_dir: str | os.PathLike[str], obj: Any, name: str = MODEL_FILE) -> str:
    """Write `obj` as a skops file in `run_dir` (atomically) with its sidecar; return the
    sha256. Refuses an object whose types would not load back (not in TRUSTED_TYPES)."""
    import skops.io as sio

    path = Path(run_dir) / name
    with atomic_path(path) as tmp:
        sio.dump(obj, tmp)
        _check_types(tmp, sio.get_untrusted_types(file=tmp), "save")
    return write_sidecar(path)


def save_ood_flag(run_dir: str | os.PathLike[str], flag: Any, info: dict[str, Any] | None
                  ) -> dict[str, Any] | None:
    """Save a run's OOD flag (`featsvm.evaluation.ood.fit_ood_flag`) as ``OOD_FILE`` with its
    sidecar; returns the config.json ``ood`` block with ``file`` and ``sha256`` added (None
    when there is no flag). The one place head and end-to-end runs write it."""
    from featsvm.evaluation.ood import OOD_FILE

    if flag is None or info is None:
        return None
    return {**info, "file": OOD_FILE, "sha256": save_model(run_dir, flag, OOD_FILE)}


def _check_types(path: Path, found: list[str], what: str) -> None:
    untrusted = sorted(set(found) - set(TRUSTED_TYPES))
    if untrusted:
        raise RunRecordError(
            f"{path}: refusing to {what} a model file holding untrusted type(s) "
            f"{', '.join(untrusted)} (a skops file may only hold featsvm.models.modelfile."
            "TRUSTED_TYPES and scikit-learn's public estimators)"
        )


def load_model(path: str | os.PathLike[str], expected_sha256: str | None = None,
               trust_pickle: bool = False) -> Any:
    """Load a model file after checking its sidecar (and `expected_sha256`, from config.json,
    when given). skops files load without running code; pickles need `trust_pickle`."""
    path = Path(path)
    actual = verify_sidecar(path)
    if expected_sha256 is not None and actual != expected_sha256:
        raise RunRecordError(
            f"{path} has sha256 {actual[:12]}…, but the run's config.json records "
            f"{expected_sha256[:12]}…: the model was replaced after the run (its sidecar "
            "too); refusing to load"
        )
    if path.suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise RunRecordError(
                f"{path} is a pickle (written by featsvm before model.skops); loading it "
                "runs whatever code it holds. Only if you made this run yourself, pass "
                "--trust-pickle (or re-fit the run to get a model.skops)"
            )
        import joblib

        return joblib.load(path)
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a broken record
        raise RunRecordError(f"{path} is not a readable skops model file ({exc})") from None
    _check_types(path, untrusted, "load")
    try:
        return sio.load(path, trusted=list(TRUSTED_TYPES))
    except Exception as exc:  # noqa: BLE001
        raise RunRecordError(f"{path}: cannot load the model ({type(exc).__name__}: "
                             f"{exc})") from None


def load_head(record: RunRecord, trust_pickle: bool = False) -> Any:
    """The fitted head of a head run, checked against its sidecar and config.json."""
    expected = recorded_sha256(record.config, str(record.config["model_file"]))
    return load_model(record.model_path, expected, trust_pickle=trust_pickle)
