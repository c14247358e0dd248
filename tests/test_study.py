"""`featsvm run` end to end on a tiny generated dataset with a tiny config."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_dataset, random_cell_image

from featsvm.cli import main
from featsvm.study import StudyError, load_study, run_study

TINY_CONFIG = """
[study]
data = "{data}"
split = "{root}/split.csv"
cache = "{root}/cache"
runs = "{root}/runs"
report = "{root}/report"
seed = 0
ratios = [0.5, 0.25, 0.25]
backbones = ["efficientnet_lite0"]
heads = ["logreg"]
weights = {{ efficientnet_lite0 = "none" }}
finetune = true

[extract]
device = "cpu"
batch_size = 8
workers = 0

[fit]
cv_folds = 2
logreg_C = [1.0]
class_weight = ["none"]
n_jobs = 1
n_boot = 10

[finetune]
models = ["basic-cnn"]
epochs = 1
batch_size = 4
basic_cnn_size = 32
basic_cnn_channels = [4, 8]
basic_cnn_dense = 8
n_boot = 10
workers = 1
device = "cpu"

[report]
best = 1
examples = 2
"""


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    data = make_dataset(tmp_path / "data", per_class=8, size=40, seed=5)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_CONFIG.format(data=data, root=tmp_path))
    return cfg


def _external_set(root: Path) -> str:
    """A tiny 'other lab' (2 patients, 2 healthy subjects) and its [[external]] table."""
    import numpy as np

    rng = np.random.default_rng(9)
    for folder, subjects, idx in (("all", ("2", "16"), 2), ("hem", ("H10", "H14"), 0)):
        (root / "lab" / folder).mkdir(parents=True)
        for s in subjects:
            for j in range(2):
                random_cell_image(rng, 48, idx).save(root / "lab" / folder /
                                                     f"UID_{s}_{j}_1_{folder}.png")
    return (f'\n[[external]]\nname = "lab"\npath = "{root / "lab"}"\n'
            'class_map = { all = "malignant", hem = "benign" }\n'
            "subject_regex = 'UID_(H?\\d+)_'\n")


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("featsvm")]


def test_run_end_to_end_then_everything_is_skipped(tiny_study: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    root = tiny_study.parent
    tiny_study.write_text(tiny_study.read_text() + _external_set(root))
    caplog.set_level(logging.INFO, logger="featsvm")
    res = run_study(tiny_study, progress=False)
    assert not res.failed, [(s.name, s.detail) for s in res.failed]
    assert [s.name for s in res.steps] == [
        "split", "extract efficientnet_lite0", "fit efficientnet_lite0 + logreg",
        "finetune basic-cnn", "external lab", "report"]
    assert all(s.status == "done" for s in res.steps)
    assert (root / "split.csv").is_file()
    assert len(res.run_ids) == 2
    report = root / "report"
    for name in ("index.html", "table.md", "table.csv", "table.json", "fig4_metrics.png",
                 "fig5_examples.png"):
        assert (report / name).is_file(), name
    rows = json.loads((report / "table.json").read_text())["rows"]
    assert sorted(r["run_id"] for r in rows if r["source"] == "measured") == sorted(res.run_ids)
    kinds = {r["kind"] for r in rows}
    assert {"head", "end_to_end", "published"} <= kinds
    # every model evaluated on the other lab; calibration, abstention and "Another lab" shown
    for run_id in res.run_ids:
        ext = json.loads((root / "runs" / run_id / "external" / "lab" / "metrics.json")
                         .read_text())
        assert ext["n_images"] == 8 and ext["bootstrap"]["unit"] == "subject"
        kind = json.loads((root / "runs" / run_id / "config.json").read_text())["kind"]
        # head and end-to-end runs both give the OOD rate (each on its own embedding)
        assert kind in ("head", "end_to_end") and ext["ood"]["available"] is True, ext["ood"]
    for name in ("trust.md", "reliability.png", "coverage-risk.png", "external-roc-lab.png"):
        assert (report / name).is_file(), name
    page = (report / "index.html").read_text()
    for title in ("Calibration", "Abstention", "Another lab"):
        assert f"<h2>{title}" in page, title
    assert "flagged out of distribution" in page and "no OOD flag in this run" not in page

    # second run: split, cache, head and CNN are all reused and said to be
    caplog.clear()
    res2 = run_study(tiny_study, progress=False)
    status = {s.name: s.status for s in res2.steps}
    assert status == {"split": "skipped", "extract efficientnet_lite0": "skipped",
                      "fit efficientnet_lite0 + logreg": "skipped", "finetune basic-cnn": "skipped",
                      "external lab": "skipped", "report": "done"}
    assert sorted(res2.run_ids) == sorted(res.run_ids)
    assert sum(line.startswith("skipped ") for line in _messages(caplog)) == 5
    assert len([p for p in (root / "runs").iterdir() if p.is_dir()]) == 2

    # a changed head grid refits only the head; split and cache are still reused
    text = tiny_study.read_text().replace("logreg_C = [1.0]", "logreg_C = [0.1]")
    tiny_study.write_text(text.replace('models = ["basic-cnn"]', "models = []"))
    res3 = run_study(tiny_study, progress=False)
    status = {s.name: s.status for s in res3.steps}
    assert status == {"split": "skipped", "extract efficientnet_lite0": "skipped",
                      "fit efficientnet_lite0 + logreg": "done", "external lab": "done",
                      "report": "done"}
    assert res3.run_ids[0] not in res.run_ids


def test_missing_data_says_how_to_get_it(tiny_study: Path, tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="10.34740/KAGGLE/DSV/2175623"):
        run_study(tiny_study, data_dir=tmp_path / "absent", progress=False)
    result = CliRunner().invoke(main, ["run", str(tiny_study), "--data", str(tmp_path / "no")])
    assert result.exit_code != 0
    assert "Acute Lymphoblastic Leukemia (ALL) image dataset" in result.output


def test_failed_backbone_is_reported_and_the_rest_goes_on(tiny_study: Path,
                                                          monkeypatch) -> None:
    text = tiny_study.read_text().replace('backbones = ["efficientnet_lite0"]',
                                          'backbones = ["efficientnet_lite0", "vgg16"]')
    text = text.replace('efficientnet_lite0 = "none"',
                        'efficientnet_lite0 = "none", vgg16 = "/no/such/file.pth"')
    text = text.replace("finetune = true", "finetune = false")
    tiny_study.write_text(text)
    res = run_study(tiny_study, progress=False)
    status = {s.name: s.status for s in res.steps}
    assert status["extract vgg16"] == "failed"
    assert status["fit vgg16 + logreg"] == "failed"
    assert status["fit efficientnet_lite0 + logreg"] == "done"
    assert status["report"] == "done"
    result = CliRunner().invoke(main, ["run", str(tiny_study), "--quiet"])
    assert result.exit_code != 0
    assert "extract vgg16" in result.output


@pytest.mark.parametrize("name", ["cpu.toml", "paper.toml"])
def test_shipped_configs_load(name: str) -> None:
    study = load_study(Path(__file__).resolve().parents[1] / "configs" / name)
    assert study.study.heads == ("svm", "logreg")
    assert "basic-cnn" in study.finetune.models


def test_split_made_outside_run_is_reused_only_if_it_matches_the_data(
        tiny_study: Path, caplog: pytest.LogCaptureFixture) -> None:
    from featsvm.data.manifest import read_manifest, write_manifest
    from featsvm.data.split import make_split
    from featsvm.study import ensure_split

    root = tiny_study.parent
    study = load_study(tiny_study)
    data = Path(study.study.data)
    make_split(data, root / "split.csv", seed=0, ratios=(0.5, 0.25, 0.25))  # no .study.json
    before = (root / "split.csv").read_bytes()
    caplog.set_level(logging.INFO, logger="featsvm")
    path, reused = ensure_split(data, study, progress=False)
    assert reused and "made outside" in _messages(caplog)[0]
    assert path.read_bytes() == before

    man = read_manifest(path)
    rows = list(man.rows)
    rows[0] = type(rows[0])(rows[0].relpath, "0" * 64, rows[0].label, rows[0].group,
                            rows[0].split)
    write_manifest(path, rows)
    caplog.clear()
    path, reused = ensure_split(data, study, progress=False)
    assert not reused and "another sha256" in _messages(caplog)[0]
    assert (root / "split.csv.study.json").is_file()
    caplog.clear()
    assert ensure_split(data, study, progress=False)[1]  # now recorded: reused


def test_cv_step_headline_table_and_reuse(tiny_study: Path) -> None:
    root = tiny_study.parent
    text = tiny_study.read_text().replace("finetune = true", "finetune = false\ncv_folds = 3")
    text = text.replace('backbones = ["efficientnet_lite0"]',
                        'backbones = ["efficientnet_lite0", "colour_stats"]')
    tiny_study.write_text(text + "\n[cv]\nlogreg_C = [0.1]\n")
    res = run_study(tiny_study, progress=False)
    assert not res.failed, [(s.name, s.detail) for s in res.failed]
    status = {s.name: s.status for s in res.steps}
    assert status["cv efficientnet_lite0 + logreg"] == "done"
    assert status["cv colour_stats + logreg"] == "done"
    cv_dir = next(p for p in (root / "runs").iterdir()
                  if p.name.startswith("efficientnet_lite0") and "-cv-" in p.name)
    cfg = json.loads((cv_dir / "config.json").read_text())
    assert cfg["kind"] == "cv" and cfg["head_config"]["logreg_C"] == [0.1]  # [cv] over [fit]
    assert cfg["cv"]["folds"] == 3
    report = root / "report"
    assert (report / "cv_table.csv").is_file()
    html = (report / "index.html").read_text()
    assert "Pooled cross-validation: every image scored once (n = 32)" in html
    assert html.index("Pooled cross-validation") < html.index("Comparison table")
    assert "Shortcut check" in html and (report / "shortcut.md").is_file()
    assert "efficientnet_lite0 + logreg" in (report / "shortcut.md").read_text()
    res2 = run_study(tiny_study, progress=False)
    assert {s.name: s.status for s in res2.steps}["cv efficientnet_lite0 + logreg"] == "skipped"
