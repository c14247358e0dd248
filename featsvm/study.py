"""`featsvm run CONFIG.toml`: the whole study from one config file.

Steps, each reusing what is already on disk with the same fingerprint (and saying so):

1. **split**: the duplicate-aware split manifest (`featsvm.data.split`); reused when the file
   exists and its recorded settings (data folder, seed, ratios, folds) and sha256 match;
2. **extract** every configured backbone into the feature cache (`featsvm.features.extract`); the
   cache itself skips images it already holds;
3. **fit** every backbone x head (`featsvm.models.fit`); skipped when a complete run record exists
   for the same split sha256, `FeatureKey` (the embeddings: cache fingerprint) and head settings;
3b. **cv** every backbone x head when ``[study] cv_folds`` is set (`featsvm.models.cv`): pooled,
   grouped K-fold CV over all images, the heads tuned with ``[fit]`` overridden by ``[cv]``;
   skipped when a complete CV run exists for the same split, cache, head settings and folds;
4. **fine-tune** every model in ``[finetune] models`` (`featsvm.models.finetune`); skipped when a
   complete run with the same training fingerprint exists (an unfinished one is resumed);
4b. **finetune-cv** every ``[finetune] models`` when ``[study] finetune_cv`` is set
   (`featsvm.models.finetune_cv`: pooled grouped K-fold CV, the folds of step 3b); skipped when
   a complete CV run with the same fingerprint exists (an unfinished one continues at its fold);
5. **external**: every run of the study on each ``[[external]]`` set (another lab's labelled
   images, labelled by folder names, a label regex on the file path or a labels CSV;
   `featsvm.evaluate`, evaluation only), skipped for runs already evaluated on it with the same
   folder, class map, subject regex, label source (regex, or CSV and its sha256) and threshold;
6. **report** on exactly the runs of this study (`featsvm.evaluation.report`), with the
   calibration, abstention and "Another lab" sections.

A failing step (e.g. weights that cannot be found for one backbone) is reported by name and
the study goes on with the rest; the summary lists it and the command exits non-zero.

Config sections: ``[study]`` (this module: paths, seed, ratios, what to run), ``[extract]``
(this module: device, precision, batch size), ``[fit]`` (`featsvm.models.heads.HeadConfig`),
``[finetune]`` (`featsvm.models.finetune.FinetuneConfig`), ``[report]``
(`featsvm.evaluation.report.ReportConfig`), ``[split]`` (the split module's own options, if any),
``[cv]`` (``[fit]`` keys overriding it inside `featsvm.models.cv`, e.g. a smaller grid),
``[[external]]`` (`featsvm.evaluate.ExternalSet`: name, path, class_map, subject_regex,
label_regex, labels).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from featsvm.config import ConfigError, load_toml, section
from featsvm.errors import FeatsvmError, StudyError
from featsvm.features.key import FeatureKey, WeightsId
from featsvm.fileio import FileLock, sha256_file, write_json_atomic
from featsvm.runs import RunRecord, list_runs, read_run

logger = logging.getLogger(__name__)

STUDY_LOCK = ".featsvm-run.lock"  # in the runs folder, held for a whole `featsvm run`
DATA_HELP = (
    "The dataset is the Kaggle 'Acute Lymphoblastic Leukemia (ALL) image dataset' "
    "(Taleqani hospital, 3,256 images, doi:10.34740/KAGGLE/DSV/2175623): open "
    "https://doi.org/10.34740/KAGGLE/DSV/2175623, download and unzip it, and pass the folder "
    "that holds Original/ with --data DIR "
    "(or set [study] data in the config)."
)


@dataclass(frozen=True)
class StudyConfig:
    """The ``[study]`` table. Relative paths are relative to the working directory."""

    data: str = "../shared/data/all-taleqani"  # image folder; --data overrides it
    split: str = "split.csv"  # the split manifest to write / reuse
    cache: str = "cache"
    runs: str = "runs"
    report: str = "report"
    seed: int = 0
    ratios: tuple[float, ...] = (0.8, 0.1, 0.1)  # train / val / test
    folds: int = 0  # grouped folds inside train written into the manifest (0 = none)
    backbones: tuple[str, ...] = ("vgg16", "inception_v3", "efficientnet_lite0")
    heads: tuple[str, ...] = ("svm", "logreg")
    weights_dir: str = ""  # "" = the FEATSVM_WEIGHTS_DIR environment variable
    # per-backbone --weights: "none" (random), "default" (library download) or a file path
    weights: dict[str, str] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)  # per-backbone embedding layer
    # inputs of the heads: "field", "cells", "cells+reinhard", "cells+grey", "cells+lowres",
    # ... (view, then stain / colour / lowres; featsvm.features.preprocess.parse_input).
    # Reinhard references come from the split's train images.
    inputs: tuple[str, ...] = ("field",)
    finetune: bool = True  # train the [finetune] models
    # pooled grouped K-fold CV of every backbone x head over all images (0 = none)
    cv_folds: int = 0
    # the same for every [finetune] model (`featsvm finetune --cv K`; 0 = none): K trainings
    finetune_cv: int = 0

    def __post_init__(self) -> None:
        if len(self.ratios) != 3 or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ConfigError(f"[study] ratios must be three numbers summing to 1: {self.ratios}")
        from featsvm.features.preprocess import parse_input

        for spec in self.inputs:
            try:
                parse_input(spec)
            except FeatsvmError as exc:
                raise ConfigError(f"[study] inputs: {exc}") from None


@dataclass(frozen=True)
class ExtractSettings:
    """The ``[extract]`` table: how `featsvm run` calls `featsvm.features.extract.extract`."""

    device: str = "auto"
    precision: str = "auto"  # bf16 where the CPU has native bf16, else fp32 (featsvm.device)
    batch_size: int = -1  # -1 = extract's default for the device
    workers: int = -1  # -1 = extract's default for the device


@dataclass
class Step:
    name: str
    status: str  # "done" | "skipped" | "failed"
    detail: str = ""
    seconds: float = 0.0


@dataclass
class StudyResult:
    steps: list[Step] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    report_dir: Path | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status == "failed"]


@dataclass(frozen=True)
class Study:
    """Every section of a study config, built and checked before anything runs."""

    path: Path
    study: StudyConfig
    extract: ExtractSettings
    fit: Any  # featsvm.models.heads.HeadConfig
    cv: Any  # featsvm.models.heads.HeadConfig inside cross-validation: [fit] with [cv] on top
    finetune: Any  # featsvm.models.finetune.FinetuneConfig
    report: Any  # featsvm.evaluation.report.ReportConfig
    split_options: dict[str, Any]
    external: tuple[Any, ...] = ()  # featsvm.evaluate.ExternalSet, from [[external]]


def load_study(path: str | os.PathLike[str]) -> Study:
    from featsvm.evaluate import external_sets
    from featsvm.evaluation.report import ReportConfig
    from featsvm.models.cv import cv_head_config
    from featsvm.models.finetune import finetune_config
    from featsvm.models.heads import HeadConfig

    path = Path(path)
    doc = load_toml(path)
    src = str(path)
    split_options = doc.get("split", {})
    if not isinstance(split_options, dict):
        raise ConfigError(f"{src}: [split] must be a table")
    return Study(
        path=path,
        study=section(StudyConfig, doc, "study", src),
        extract=section(ExtractSettings, doc, "extract", src),
        fit=section(HeadConfig, doc, "fit", src),
        cv=cv_head_config(doc, src),
        finetune=finetune_config(doc, src),
        report=section(ReportConfig, doc, "report", src),
        split_options=dict(split_options),
        external=external_sets(doc, src),
    )


# ---------------------------------------------------------------- step helpers


def _split_settings(data_dir: Path, cfg: StudyConfig, options: dict[str, Any]) -> dict[str, Any]:
    return {"data_dir": str(data_dir.resolve()), "seed": cfg.seed, "ratios": list(cfg.ratios),
            "folds": cfg.folds, "options": options}


def _split_meta_path(split_path: Path) -> Path:
    return split_path.with_name(split_path.name + ".study.json")


def ensure_split(data_dir: Path, study: Study, progress: bool = True) -> tuple[Path, bool]:
    """The split manifest for this data and these settings: reused when its recorded settings
    and sha256 match, else (re)made. Returns (path, reused)."""
    cfg = study.study
    split_path = Path(cfg.split)
    meta_path = _split_meta_path(split_path)
    settings = _split_settings(data_dir, cfg, study.split_options)
    if split_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            meta = {}
        if meta.get("settings") == settings and meta.get("sha256") == sha256_file(split_path):
            return split_path, True
        logger.info("split: %s was made with other settings or changed; re-splitting",
                    split_path)
    elif split_path.is_file():
        problem = _manifest_mismatch(split_path, data_dir)
        if problem is None:
            logger.info("split: reusing %s, made outside `featsvm run` (its seed and ratios are "
                        "not recorded; delete it to re-split with the [study] settings)",
                        split_path)
            return split_path, True
        logger.info("split: %s does not match %s (%s); re-splitting", split_path, data_dir,
                    problem)
    _make_split(data_dir, split_path, cfg, study.split_options, progress)
    write_json_atomic(meta_path, {"settings": settings, "sha256": sha256_file(split_path)})
    return split_path, False


def _manifest_mismatch(split_path: Path, data_dir: Path) -> str | None:
    """Why an existing manifest does not describe the images in `data_dir` (None: it does,
    every listed file is there with its recorded sha256)."""
    from featsvm.data.manifest import read_manifest

    try:
        man = read_manifest(split_path)
    except (OSError, ValueError) as exc:
        return str(exc)
    for r in man.rows:
        path = data_dir / r.relpath
        if not path.is_file():
            return f"{r.relpath} is missing"
        if sha256_file(path) != r.sha256:
            return f"{r.relpath} has another sha256"
    return None if man.rows else "it lists no images"


def _make_split(data_dir: Path, out: Path, cfg: StudyConfig, options: dict[str, Any],
                progress: bool) -> None:
    """`featsvm.data.split.make_split` with the ``[split]`` table: ``subset``, ``class_map`` and a
    ``[split.duplicates]`` sub-table (`featsvm.data.duplicates.DuplicateConfig`)."""
    from featsvm.config import build
    from featsvm.data import split as split_mod
    from featsvm.data.duplicates import DuplicateConfig

    opts = dict(options)
    unknown = sorted(set(opts) - {"subset", "class_map", "duplicates"})
    if unknown:
        raise ConfigError(f"[split]: unknown key(s) {unknown}; allowed: class_map, duplicates, "
                          "subset (seed, ratios and folds are set in [study])")
    dup = opts.pop("duplicates", None)
    result = split_mod.make_split(
        data_dir, out, seed=cfg.seed, ratios=tuple(cfg.ratios),  # type: ignore[arg-type]
        folds=cfg.folds or None,
        duplicate_config=build(DuplicateConfig, dup, "[split.duplicates]") if dup else None,
        progress=progress, **opts,
    )
    for line in split_mod.summary_lines(result, max_groups=5):
        logger.info("  %s", line)


def _weights_for(cfg: StudyConfig, backbone: str) -> str | None:
    return cfg.weights.get(backbone) or None


def _weights_dir(cfg: StudyConfig) -> str | None:
    return cfg.weights_dir or None  # None: features.weights falls back to $FEATSVM_WEIGHTS_DIR


def _plain(obj: Any) -> Any:
    """Dataclass/tuple values as they look after a JSON round trip."""
    return json.loads(json.dumps(asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj,
                                 sort_keys=True, default=list))


def find_head_run(
    runs: list[RunRecord], key: FeatureKey, head: str, split_sha: str, head_config: Any,
) -> RunRecord | None:
    """A complete head run fitted on the embeddings `key` names, with the same head, split
    and head settings."""
    want = _plain(head_config.to_json())  # without execution-only settings (backend)
    for r in reversed(runs):  # newest id last: prefer the latest
        c = r.config
        if (c.get("kind") == "head" and c.get("backbone") == key.backbone
                and c.get("head") == head
                and (c.get("split") or {}).get("sha256") == split_sha
                and (c.get("cache") or {}).get("fingerprint") == key.fingerprint
                and _plain(c.get("head_config")) == want):
            return r
    return None


def finetune_fingerprint(model: str, study: Study, split_sha: str, data_dir: Path,
                         split_path: Path | None = None) -> str:
    """The fingerprint `featsvm.models.finetune` records for this model, computed without training
    (weights are only resolved and hashed, not loaded into a model)."""
    from featsvm.models import finetune as ft

    cfg = study.finetune.for_model(model)
    options = (ft.image_options(cfg, split_path, data_dir).to_dict()
               if cfg.input != "field" and split_path is not None else None)
    if model == ft.BASIC_CNN:
        weights = WeightsId.none()
    else:
        from featsvm.features.backbones import describe

        _spec, info, _pre = describe(model, _weights_for(study.study, model),
                                     _weights_dir(study.study))
        weights = WeightsId.from_info(info)
    return ft.fingerprint(cfg, split_sha, weights, data_dir, options)


def find_finetune_run(runs: list[RunRecord], fp: str) -> RunRecord | None:
    for r in reversed(runs):
        if r.config.get("kind") == "end_to_end" and r.config.get("fingerprint") == fp:
            return r
    return None


# ---------------------------------------------------------------- the study


def run_study(
    config_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    backend: str | None = None,
) -> StudyResult:
    """Run (or complete) the study described by `config_path`; see the module docstring.
    `backend`: where the heads' searches and CV folds run ("local" | "ray"), overriding
    ``[fit] backend`` / ``[cv] backend`` (it changes no result, so no run's identity)."""
    study = with_backend(load_study(config_path), backend)
    data = check_data_dir(Path(data_dir) if data_dir is not None else Path(study.study.data))
    runs_dir = Path(study.study.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    # one study per runs folder at a time: a second one would fit the same heads again
    with FileLock(runs_dir / STUDY_LOCK, True, _study_busy):
        return StudyRun(study, data, progress).run()


def with_backend(study: Study, backend: str | None) -> Study:
    """`study` with its fits and CV on `backend` (None: as configured)."""
    if backend is None:
        return study
    return replace(study, fit=replace(study.fit, backend=backend),
                   cv=replace(study.cv, backend=backend))


def _study_busy(lock_path: Path, exclusive: bool) -> StudyError:
    return StudyError(
        f"another featsvm run is working on the runs folder {lock_path.parent} (lock held on "
        f"{lock_path}); wait for it to finish and run this again (it will reuse what the "
        "other one made). A killed run releases the lock automatically."
    )


def check_data_dir(data: Path) -> Path:
    """`data` if it holds the dataset's class folders, else a StudyError saying how to get it."""
    from featsvm.data.dataset import find_class_dir

    if not data.is_dir():
        raise StudyError(f"data folder {data} not found. {DATA_HELP}")
    try:
        find_class_dir(data)
    except FileNotFoundError as exc:
        raise StudyError(f"{exc}. {DATA_HELP}") from None
    return data


StepOutcome = tuple[str, str]  # ("done" | "skipped", detail)


class StudyRun:
    """One run of a study: the steps in order (split, extract, fit, finetune, report), each a
    method returning ``(status, detail)`` and recorded the same way by `step` (a failing step
    is logged and recorded, and the study goes on with the steps that do not depend on it)."""

    def __init__(self, study: Study, data: Path, progress: bool) -> None:
        self.study, self.cfg, self.data = study, study.study, data
        self.progress = progress
        self.runs_dir = Path(self.cfg.runs)
        self.result = StudyResult()
        self.manifest: Any = None  # featsvm.data.manifest.Manifest, once the split step ran
        # (backbone, input) pairs whose extract step succeeded
        self.extracted: set[tuple[str, str]] = set()

    def run(self) -> StudyResult:
        t_start = time.perf_counter()
        cfg = self.cfg
        if self.step("split", self.split):
            for backbone in cfg.backbones:
                for spec in cfg.inputs:
                    if self.step(f"extract {_tag(backbone, spec)}", self.extract, backbone,
                                 spec):
                        self.extracted.add((backbone, spec))
            for backbone in cfg.backbones:
                for spec in cfg.inputs:
                    for head in cfg.heads:
                        blocked = ("" if (backbone, spec) in self.extracted
                                   else f"extract {_tag(backbone, spec)} failed")
                        self.step(f"fit {_tag(backbone, spec)} + {head}", self.fit, backbone,
                                  head, spec, blocked=blocked)
            for backbone in cfg.backbones if cfg.cv_folds else ():
                for spec in cfg.inputs:
                    for head in cfg.heads:
                        blocked = ("" if (backbone, spec) in self.extracted
                                   else f"extract {_tag(backbone, spec)} failed")
                        self.step(f"cv {_tag(backbone, spec)} + {head}", self.cv, backbone,
                                  head, spec, blocked=blocked)
            if cfg.finetune:
                for model in self.study.finetune.models:
                    self.step(f"finetune {model}", self.finetune, model)
            if cfg.finetune and cfg.finetune_cv:
                for model in self.study.finetune.models:
                    self.step(f"finetune-cv {model}", self.finetune_cv, model)
            for ext in self.study.external:
                self.step(f"external {ext.name}", self.external, ext)
            self.step("report", self.report)
        self.result.seconds = time.perf_counter() - t_start
        return self.result

    def step(self, name: str, fn: Callable[..., StepOutcome], *args: Any,
             blocked: str = "") -> bool:
        """Run one step and record it (done / skipped / failed, with its time); `blocked`:
        the step cannot run because of an earlier failure, recorded as failed without running."""
        res = self.result
        if blocked:
            res.steps.append(Step(name, "failed", blocked))
            logger.error("FAILED %s: %s", name, blocked)
            return False
        logger.info("== %s", name)
        t0 = time.perf_counter()
        try:
            status, detail = fn(*args)
        except Exception as exc:  # noqa: BLE001 - one failing step must not hide the others
            detail = f"{type(exc).__name__}: {exc}"
            res.steps.append(Step(name, "failed", detail, time.perf_counter() - t0))
            logger.error("FAILED %s: %s", name, detail)
            # the traceback with -v (or FEATSVM_DEBUG=1, as before)
            logger.log(logging.ERROR if os.environ.get("FEATSVM_DEBUG") else logging.DEBUG,
                       "%s", traceback.format_exc())
            return False
        res.steps.append(Step(name, status, detail, time.perf_counter() - t0))
        logger.info("%s %s: %s (%.1f s)", "skipped" if status == "skipped" else "done", name,
                    detail, time.perf_counter() - t0)
        return True

    # ---- settings per backbone

    def _weights(self, backbone: str) -> str | None:
        return _weights_for(self.cfg, backbone)

    def _weights_dir(self) -> str | None:
        return _weights_dir(self.cfg)

    def _options(self, spec: str) -> Any:
        """ImageOptions of a study input (a Reinhard reference from the split's train images)."""
        from featsvm.features.preprocess import input_options

        return input_options(spec, self.manifest.path, self.data)

    # ---- the steps

    def split(self) -> StepOutcome:
        from featsvm.data.manifest import read_manifest

        path, reused = ensure_split(self.data, self.study, self.progress)
        self.manifest = man = read_manifest(path)
        counts = ", ".join(f"{s} {len(man.subset(s))}" for s in ("train", "val", "test"))
        if reused:
            return "skipped", f"reused {path} ({counts})"
        return "done", f"wrote {path} ({counts})"

    def extract(self, backbone: str, spec: str = "field") -> StepOutcome:
        from featsvm.features.extract import extract

        cfg, ex = self.cfg, self.study.extract
        s = extract(
            self.data, backbone, weights=self._weights(backbone),
            weights_dir=self._weights_dir(), cache_dir=cfg.cache, device=ex.device,
            precision=ex.precision,
            batch_size=None if ex.batch_size < 0 else ex.batch_size,
            workers=None if ex.workers < 0 else ex.workers,
            layer=cfg.layers.get(backbone), progress=self.progress, records=self.manifest.rows,
            options=self._options(spec),
        )
        bad = f"; {len(s.skipped)} image(s) skipped: " + ", ".join(
            f"{p} ({why})" for p, why in s.skipped[:5]) if s.skipped else ""
        if s.n_new == 0:
            return "skipped", f"all {s.n_cached} images already cached in {s.cache_path}{bad}"
        return "done", (f"{s.n_new} new, {s.n_cached} cached, {s.images_per_s:.1f} img/s "
                        f"-> {s.cache_path}{bad}")

    def _cache_tag(self, backbone: str) -> str:
        """The precision `backbone`'s cache is named by (``auto`` resolved as extract
        resolves it)."""
        from featsvm.features.engines import cache_tag

        ex = self.study.extract
        return cache_tag("torch", ex.precision, ex.device, backbone)

    def _feature_key(self, backbone: str, options: Any) -> FeatureKey:
        """The `FeatureKey` of the cache a fit or cv step of `backbone` reads
        (CacheMissingError, naming the extract command, when that cache is absent)."""
        from featsvm.features.backbones import feature_key
        from featsvm.features.cache import locate_cache

        args = (self._weights(backbone), self._weights_dir(), self.cfg.layers.get(backbone),
                self._cache_tag(backbone), options)
        key = feature_key(backbone, *args)
        if not (Path(self.cfg.cache) / key.file_name).is_file():
            locate_cache(self.cfg.cache, backbone, args[0], args[1], args[3], args[2], options)
        return key

    def fit(self, backbone: str, head: str, spec: str = "field") -> StepOutcome:
        from featsvm.models.fit import fit

        cfg, study = self.cfg, self.study
        options = self._options(spec)
        key = self._feature_key(backbone, options)
        existing, _ = list_runs(self.runs_dir)
        found = find_head_run(existing, key, head, self.manifest.sha256, study.fit)
        if found is not None:
            self.result.run_ids.append(found.run_id)
            return "skipped", f"run {found.run_id} has the same split, cache and grid"
        rec = fit(backbone, head, self.manifest.path, cache_dir=cfg.cache,
                  weights=self._weights(backbone), weights_dir=self._weights_dir(),
                  runs_dir=self.runs_dir, config=study.fit,
                  precision=self._cache_tag(backbone), layer=cfg.layers.get(backbone),
                  progress=self.progress, options=options)
        self.result.run_ids.append(rec.run_id)
        return "done", _headline(rec)

    def cv(self, backbone: str, head: str, spec: str = "field") -> StepOutcome:
        from featsvm.models.cv import cross_validate, find_cv_run

        cfg, study = self.cfg, self.study
        options = self._options(spec)
        key = self._feature_key(backbone, options)
        existing, _ = list_runs(self.runs_dir)
        found = find_cv_run(existing, key, head, self.manifest.sha256, study.cv, cfg.cv_folds)
        if found is not None:
            self.result.run_ids.append(found.run_id)
            return "skipped", f"run {found.run_id} has the same split, cache, grid and folds"
        rec = cross_validate(backbone, head, self.manifest.path, cache_dir=cfg.cache,
                             weights=self._weights(backbone), weights_dir=self._weights_dir(),
                             runs_dir=self.runs_dir, config=study.cv, folds=cfg.cv_folds,
                             precision=self._cache_tag(backbone),
                             layer=cfg.layers.get(backbone),
                             progress=self.progress, options=options)
        self.result.run_ids.append(rec.run_id)
        return "done", _headline(rec)

    def finetune(self, model: str) -> StepOutcome:
        from featsvm.models.finetune import finetune

        fp = finetune_fingerprint(model, self.study, self.manifest.sha256, self.data,
                                  self.manifest.path)
        existing, _ = list_runs(self.runs_dir)
        found = find_finetune_run(existing, fp)
        if found is not None:
            self.result.run_ids.append(found.run_id)
            return "skipped", f"run {found.run_id} has the same training fingerprint"
        out = finetune(self.data, self.manifest.path, self.study.finetune.for_model(model),
                       weights=self._weights(model), weights_dir=self._weights_dir(),
                       runs_dir=self.runs_dir, progress=self.progress)
        if out.record is None:
            raise StudyError(f"training stopped before the end; resumable in {out.run_dir}")
        self.result.run_ids.append(out.record.run_id)
        return "done", _headline(out.record)

    def finetune_cv(self, model: str) -> StepOutcome:
        from featsvm.models.finetune_cv import cv_fingerprint, find_cv_run, finetune_cv

        folds = self.cfg.finetune_cv
        fp = finetune_fingerprint(model, self.study, self.manifest.sha256, self.data)
        existing, _ = list_runs(self.runs_dir)
        found = find_cv_run(existing, cv_fingerprint(fp, folds))
        if found is not None:
            self.result.run_ids.append(found.run_id)
            return "skipped", f"run {found.run_id} has the same training fingerprint and folds"
        out = finetune_cv(self.data, self.manifest.path, self.study.finetune.for_model(model),
                          folds, weights=self._weights(model), weights_dir=self._weights_dir(),
                          runs_dir=self.runs_dir, progress=self.progress)
        self.result.run_ids.append(out.record.run_id)
        return "done", _headline(out.record)

    def external(self, ext: Any) -> StepOutcome:
        """Evaluate every model of the study on one ``[[external]]`` set (evaluation only:
        nothing is fitted or chosen on it); runs already evaluated on it are skipped."""
        from featsvm.evaluate import evaluate_set, is_current
        from featsvm.predict import EmbeddingMemo

        if not Path(ext.path).is_dir():
            raise StudyError(f"[[external]] {ext.name}: folder {ext.path} not found")
        done, kept, aucs = 0, 0, []
        memo = EmbeddingMemo()  # the heads of one backbone embed each image once
        for run_id in self.result.run_ids:
            run_dir = self.runs_dir / run_id
            kind = read_run(run_dir).config.get("kind")
            if kind not in ("head", "end_to_end"):
                continue  # e.g. pooled-CV records: no single model to apply
            if is_current(run_dir, ext):
                kept += 1
                continue
            res = evaluate_set(run_dir, ext, weights_dir=self._weights_dir(),
                               device=self.study.extract.device, progress=self.progress,
                               memo=memo)
            done += 1
            auc = res.metrics.get("roc_auc")
            aucs.append(f"{res.model} {'n/a' if auc is None else f'{auc:.3f}'}")
        if not done:
            return "skipped", f"{kept} run(s) already evaluated on {ext.name}"
        return "done", (f"{done} run(s) evaluated on {ext.name} ({kept} already were); "
                        f"ROC-AUC: {', '.join(aucs)}")

    def report(self) -> StepOutcome:
        from featsvm.evaluation.report import write_report

        res = self.result
        if not res.run_ids:
            raise StudyError("no run finished, nothing to report")
        rep = write_report(self.runs_dir, self.cfg.report, data_dir=self.data,
                           config=self.study.report, only=res.run_ids)
        res.report_dir = rep.out_dir
        for note in rep.notes:
            logger.info("note: %s", note)
        return "done", f"{len(rep.files)} files in {rep.out_dir} (open index.html)"


def _tag(backbone: str, spec: str) -> str:
    """Step name of a backbone on a study input ("alexnet", "alexnet <cells+reinhard>")."""
    return backbone if spec == "field" else f"{backbone} <{spec}>"


def _headline(rec: RunRecord) -> str:
    block = "pooled" if rec.config.get("kind") == "cv" else "test"
    t = rec.metrics.get(block) or {}
    b = t.get("binary") or {}

    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * float(v):.1f}%"

    where = "pooled CV" if block == "pooled" else "test"
    return (f"run {rec.run_id}: {where} accuracy {pct(t.get('accuracy'))}, sensitivity "
            f"{pct(b.get('sensitivity'))}, specificity {pct(b.get('specificity'))}")


def summary_lines(res: StudyResult) -> list[str]:
    width = max((len(s.name) for s in res.steps), default=4)
    lines = [f"{s.name:<{width}}  {s.status:<7}  {s.seconds:7.1f} s  {s.detail}"
             for s in res.steps]
    lines.append(f"total wall time {res.seconds / 60:.1f} min")
    return lines
