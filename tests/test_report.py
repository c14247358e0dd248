"""`featsvm report` on synthetic but well-formed run records written with featsvm.runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset

from featsvm.cli import main
from featsvm.data.dataset import scan
from featsvm.data.manifest import ManifestRow, read_manifest, write_manifest
from featsvm.evaluation import report
from featsvm.evaluation.metrics import score_predictions
from featsvm.labels import LABELS
from featsvm.runs import (
    REQUIRED_CONFIG_KEYS,
    finish_run,
    new_run_dir,
    versions,
    write_sidecar,
)

NSFW_SHA = "9705e7702949faae59bcbd61e11f337c245804e85ea8839d0e3139db680184f3"


def make_split(data_dir: Path, out: Path) -> Path:
    """A tiny split manifest: per class, images 0-2 train, 3 val, 4-5 test (one group each)."""
    res = scan(data_dir)
    rows = []
    for g, rec in enumerate(res.records):
        j = int(Path(rec.relpath).stem.rsplit("-", 1)[1])
        split = "train" if j < 3 else ("val" if j == 3 else "test")
        rows.append(ManifestRow(rec.relpath, rec.sha256, rec.label, g, split))
    write_manifest(out, rows)
    return out


def write_fake_run(
    runs_dir: Path, split_path: Path, *, model: str, kind: str = "head",
    backbone: str | None = "vgg16", head: str | None = "svm", skill: float = 2.0,
    seed: int = 0, weights: dict | None = None, extra: dict | None = None,
) -> Path:
    """A complete run record whose predictions are noisy but better than chance; metrics.json
    comes from featsvm.evaluation.metrics so its keys are the real ones."""
    man = read_manifest(split_path)
    scored = [r for r in man.rows if r.split in ("val", "test")]
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(scored), len(LABELS)))
    for i, r in enumerate(scored):
        logits[i, LABELS.index(r.label)] += skill
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    proba = np.round(proba, 6)  # what predictions.csv keeps
    run_dir = new_run_dir(runs_dir, model.replace(" + ", "-"))
    model_file = "model.joblib" if kind == "head" else "model.pt"
    (run_dir / model_file).write_bytes(b"not a real model " + model.encode())
    write_sidecar(run_dir / model_file)
    config = {
        "run_id": run_dir.name, "kind": kind, "model": model, "backbone": backbone, "head": head,
        "weights": weights or {"label": "test ImageNet", "sha256": "ab" * 32},
        "preprocessing": {"input_size": 224}, "split": {"path": str(split_path),
                                                         "sha256": man.sha256},
        "seed": seed, "model_file": model_file,
        "timing": {"fit_seconds": 1.5 + seed, "extract_images_per_s": 40.0 + seed},
        "versions": versions(), "created": "2026-01-01T00:00:00Z",
    }
    config.update(extra or {})
    assert set(REQUIRED_CONFIG_KEYS) <= set(config)
    metrics = score_predictions(man, scored, proba, n_boot=50, seed=0)
    finish_run(run_dir, config, metrics, scored, proba)
    return run_dir


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("study")
    data = make_dataset(tmp_path / "data", per_class=6, size=48)
    split = make_split(data, tmp_path / "split.csv")
    runs = tmp_path / "runs"
    write_fake_run(runs, split, model="vgg16 + svm", seed=1, skill=3.0)
    write_fake_run(runs, split, model="inception_v3 + logreg", backbone="inception_v3",
                   head="logreg", seed=2, skill=1.0,
                   weights={"label": "InceptionV3 from nsfwjs", "sha256": NSFW_SHA})
    write_fake_run(runs, split, model="basic-cnn", kind="end_to_end", backbone=None, head=None,
                   seed=3, skill=0.5, weights={"label": "none", "sha256": None})
    (runs / "crashed-run").mkdir()  # an incomplete folder: listed, never read
    return {"data": data, "split": split, "runs": runs, "root": tmp_path}


@pytest.fixture(scope="module")
def written(study: dict[str, Path]) -> report.ReportResult:
    return report.write_report(study["runs"], study["root"] / "report", data_dir=study["data"])


def test_report_files_and_table_values(study: dict[str, Path],
                                       written: report.ReportResult) -> None:
    out = study["root"] / "report"
    res = written
    names = {p.name for p in res.files}
    run_ids = sorted(p.name for p in study["runs"].iterdir() if p.name != "crashed-run")
    expected = {"table.md", "table.csv", "table.json", "fig4_metrics.png", "fig5_examples.png",
                "index.html"}
    expected |= {f"confusion-{r}.png" for r in run_ids}
    assert expected <= names
    assert {n for n in names if n.startswith("roc-")} == {f"roc-{r}.png" for r in run_ids}
    for p in res.files:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("crashed-run" in n for n in res.notes)

    rows = json.loads((out / "table.json").read_text())["rows"]
    measured = [r for r in rows if r["source"] == "measured"]
    assert sorted(r["run_id"] for r in measured) == run_ids
    for r in measured:
        m = json.loads((study["runs"] / r["run_id"] / "metrics.json").read_text())["test"]
        assert r["n"] == m["n"]
        assert r["accuracy"] == m["accuracy"]
        assert r["sensitivity"] == m["binary"]["sensitivity"]
        assert r["specificity"] == m["binary"]["specificity"]
        assert r["precision"] == m["binary"]["precision"]
        assert r["precision_ci"] == m["ci95"]["binary.precision"]
        assert r["macro_f1"] == m["macro_f1"]
        assert r["mcc"] == m["mcc"]
        assert r["roc_auc_ovr"] == m["roc_auc_ovr"]
        cfg = json.loads((study["runs"] / r["run_id"] / "config.json").read_text())
        assert r["train_seconds"] == cfg["timing"]["fit_seconds"]
        assert r["extract_images_per_s"] == cfg["timing"]["extract_images_per_s"]

    published = [r for r in rows if r["source"] == "published"]
    assert len(published) == 1
    pub = published[0]
    assert (pub["accuracy"], pub["sensitivity"], pub["specificity"], pub["precision"]) == (
        0.94, 0.82, 0.68, 0.86)

    with open(out / "table.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    by_id = {r["run_id"]: r for r in csv_rows}
    for r in measured:
        assert float(by_id[r["run_id"]]["sensitivity"]) == pytest.approx(r["sensitivity"])
    md = (out / "table.md").read_text()
    assert "published" in md and "94.0" in md
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == sum(p.suffix == ".png" for p in res.files)
    assert "<img" in page and 'src="confusion' not in page  # self-contained
    assert "10.34740/KAGGLE/DSV/2175623" in page
    # the split manifest is readable, so the protocol lists its counts
    assert "24 images in 24 duplicate groups" in page


def test_best_models_ranked_on_val_not_test(study: dict[str, Path],
                                            written: report.ReportResult) -> None:
    runs = {p.name: json.loads((p / "metrics.json").read_text())
            for p in study["runs"].iterdir() if (p / "metrics.json").is_file()}
    by_val = sorted(runs, key=lambda k: (-runs[k]["val"]["macro_f1"],
                                         -runs[k]["val"]["balanced_accuracy"], k))
    assert written.best_run_ids == by_val[:3]


def test_report_is_deterministic(study: dict[str, Path], written: report.ReportResult) -> None:
    a, b = written.out_dir, study["root"] / "b"
    report.write_report(study["runs"], b, data_dir=study["data"])
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    for name in files_a:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_without_images_grid_is_skipped_with_a_note(study: dict[str, Path]) -> None:
    out = study["root"] / "nodata"
    res = report.write_report(study["runs"], out, config=report.ReportConfig(best=1))
    assert not (out / "fig5_examples.png").exists()
    assert any("Figure 5" in n for n in res.notes)
    assert "--data DIR" in (out / "index.html").read_text()


def test_grid_uses_a_recorded_data_dir(study: dict[str, Path]) -> None:
    runs = study["root"] / "runs-recorded"
    write_fake_run(runs, study["split"], model="basic-cnn", kind="end_to_end", backbone=None,
                   head=None, extra={"data_dir": str(study["data"])})
    res = report.write_report(runs, study["root"] / "recorded")
    assert (study["root"] / "recorded" / "fig5_examples.png").is_file()
    assert any(str(study["data"]) in n for n in res.notes)


def test_provenance_flags_non_imagenet_weights(study: dict[str, Path]) -> None:
    from featsvm.runs import list_runs

    runs, _ = list_runs(study["runs"])
    prov = {p["backbone"]: p for p in report.weight_provenance(runs)}
    assert prov["inception_v3"]["note"].startswith("NOT plain ImageNet")
    assert prov["inception_v3"]["sha256"] == NSFW_SHA
    assert prov["vgg16"]["note"] == "ImageNet"
    assert "scratch" in prov["basic-cnn"]["note"]


def test_stale_figures_are_removed(study: dict[str, Path]) -> None:
    out = study["root"] / "stale"
    out.mkdir()
    (out / "confusion-gone-run.png").write_bytes(b"old")
    report.write_report(study["runs"], out, config=report.ReportConfig(best=0))
    assert not (out / "confusion-gone-run.png").exists()


def test_cli_report(study: dict[str, Path]) -> None:
    out = study["root"] / "cli-report"
    cfg = study["root"] / "report.toml"
    cfg.write_text("[report]\nbest = 1\nexamples = 2\n")
    result = CliRunner().invoke(main, ["report", "--runs", str(study["runs"]), "--out", str(out),
                                       "--data", str(study["data"]), "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("roc-*.png"))) == 1 and (out / "fig5_examples.png").is_file()
    assert "VGG16 (reference study, published)" in result.output
    assert (out / "index.html").is_file()
    empty = CliRunner().invoke(main, ["report", "--runs", str(study["root"] / "none"),
                                      "--out", str(out)])
    assert empty.exit_code != 0
    assert "no complete run records" in empty.output


def test_html_escapes_what_runs_record(study: dict[str, Path]) -> None:
    """Every value from a run record reaches the page through the autoescaping template."""
    runs = study["root"] / "runs-markup"
    write_fake_run(runs, study["split"], model="<script>alert(1)</script> & co",
                   weights={"label": "\"quoted\" <b>label</b>", "sha256": "cd" * 32})
    out = study["root"] / "markup"
    report.write_report(runs, out, config=report.ReportConfig(best=1))
    page = (out / "index.html").read_text()
    assert "<script>" not in page and "<b>label" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
    assert "&lt;b&gt;label&lt;/b&gt;" in page
