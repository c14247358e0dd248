"""scripts/results_table.py: the docs' results tables come from a report folder, never by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import make_dataset
from test_report import make_split, write_fake_run

from featsvm.evaluation import report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "results_table.py"
_spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
assert _spec is not None and _spec.loader is not None
rt = importlib.util.module_from_spec(_spec)
sys.modules["results_table"] = rt
_spec.loader.exec_module(rt)

BLOCKS_DOC = ("results-cv", "results-test", "results-external")


def _docs(tmp_path: Path) -> tuple[Path, Path]:
    doc, readme = tmp_path / "results.md", tmp_path / "README.md"
    doc.write_text("# Results\n\nintro\n\n" + "".join(
        f"{rt.begin(n)}\nplaceholder\n{rt.end(n)}\n\ntext after {n}\n\n" for n in BLOCKS_DOC),
        encoding="utf-8")
    readme.write_text(f"# featsvm\n\n{rt.begin('headline-table')}\nold\n"
                      f"{rt.end('headline-table')}\n\nthe rest\n", encoding="utf-8")
    return doc, readme


def _external_metrics(auc: float) -> dict:
    """The keys `featsvm evaluate` writes that the "Another lab" table reads."""
    return {"n_images": 40, "n_subjects": 6, "bootstrap": {"unit": "subject"},
            "roc_auc": auc, "ci95": {"roc_auc": [auc - 0.1, auc + 0.1]},
            "own_decision": {"sensitivity": 0.9, "specificity": 0.2, "precision": 0.5,
                             "ci95": {"sensitivity": [0.8, 1.0], "specificity": [0.1, 0.3]}},
            "at_threshold": {"sensitivity": 0.5, "specificity": 0.5, "abstention_rate": 0.7},
            "calibration": {"binary": {"ece": 0.4}}, "predicted_malignant_share": 0.8}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `featsvm report` folder over fake runs: two head runs (one evaluated on an
    external set) and a pooled CV run."""
    tmp = tmp_path_factory.mktemp("rt")
    split = make_split(make_dataset(tmp / "data", per_class=6, size=48), tmp / "split.csv")
    runs = tmp / "runs"
    a = write_fake_run(runs, split, model="alexnet + svm", skill=3.0)
    write_fake_run(runs, split, model="vgg16 + logreg", head="logreg", seed=1)
    ext = a / "external" / "cnmc-sample"
    ext.mkdir(parents=True)
    (ext / "metrics.json").write_text(json.dumps(_external_metrics(0.43)), encoding="utf-8")
    cv = write_fake_run(runs, split, model="alexnet + svm", seed=2)
    cfg = json.loads((cv / "config.json").read_text())
    metrics = json.loads((cv / "metrics.json").read_text())
    cfg["kind"] = "cv"  # a CV run scores every image once: its block is "pooled"
    metrics = {"pooled": metrics["test"]}
    (cv / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    cfg["artefacts"].pop("metrics.json", None)
    (cv / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    out = tmp / "report"
    report.write_report(runs, out, config=report.ReportConfig(best=0))
    return out


def test_the_report_has_what_the_script_reads(report_dir: Path) -> None:
    for name in (rt.TABLE_MD, rt.TABLE_JSON, rt.CV_JSON, rt.EXTERNAL_JSON):
        assert (report_dir / name).is_file(), name


def test_tables_go_between_the_markers_and_nothing_else_changes(report_dir: Path,
                                                                 tmp_path: Path) -> None:
    doc, readme = _docs(tmp_path)
    args = [str(report_dir), "--doc", str(doc), "--readme", str(readme)]
    assert rt.main([*args, "--check"]) == 1  # stale: placeholders
    assert rt.main(args) == 0
    text = doc.read_text(encoding="utf-8")
    assert "placeholder" not in text and "intro" in text
    assert all(f"text after {n}" in text for n in BLOCKS_DOC)
    table_md = (report_dir / "table.md").read_text(encoding="utf-8").strip()
    assert table_md in text  # the test-split table verbatim
    cv_part = text[text.index(rt.begin("results-cv")):text.index(rt.end("results-cv"))]
    assert "alexnet + svm" in cv_part and "Pooled out-of-fold" in cv_part
    assert "vgg16 + logreg" not in cv_part  # it has no CV run
    ext_part = text[text.index(rt.begin("results-external")):]
    assert "cnmc-sample" in ext_part and "0.430 [0.330, 0.530]" in ext_part
    head = readme.read_text(encoding="utf-8")
    assert "the rest" in head and "old" not in head
    line = next(x for x in head.splitlines() if x.startswith("| alexnet + svm"))
    assert line.endswith("| 0.43 [0.33, 0.53] |")
    vgg = next(x for x in head.splitlines() if x.startswith("| vgg16 + logreg"))
    assert vgg.split("|")[2].strip() == "–" and vgg.split("|")[-2].strip() == "–"
    assert "published" not in head  # only measured rows in the headline
    assert rt.main([*args, "--check"]) == 0  # now up to date
    assert rt.main(args) == 0 and doc.read_text(encoding="utf-8") == text  # idempotent


def test_missing_tables_and_markers_are_said(report_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in (rt.TABLE_MD, rt.TABLE_JSON):
        (bare / name).write_bytes((report_dir / name).read_bytes())
    doc, readme = _docs(tmp_path)
    assert rt.main([str(bare), "--doc", str(doc), "--readme", str(readme)]) == 0
    text = doc.read_text(encoding="utf-8")
    assert "no pooled cross-validation runs" in text and "no evaluation on another lab" in text
    readme.write_text("# no markers\n", encoding="utf-8")
    assert rt.main([str(bare), "--doc", str(doc), "--readme", str(readme)]) == 2
    assert rt.main([str(tmp_path / "nowhere"), "--doc", str(doc), "--readme", str(readme)]) == 2
    # --no-readme: only the doc (another study's page, e.g. docs/transfer.md)
    assert rt.main([str(bare), "--doc", str(doc), "--readme", str(readme), "--no-readme"]) == 0
    assert readme.read_text(encoding="utf-8") == "# no markers\n"


def test_the_repository_docs_carry_every_marker() -> None:
    """docs/results.md and README.md hold the blocks the script fills (generated, never typed)."""
    doc = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    transfer = (ROOT / "docs" / "transfer.md").read_text(encoding="utf-8")
    for name in BLOCKS_DOC:
        assert rt.begin(name) in doc and rt.end(name) in doc
        assert rt.begin(name) in transfer and rt.end(name) in transfer  # configs/transfer.toml
    assert rt.begin("headline-table") in readme and rt.end("headline-table") in readme
    assert len(readme.splitlines()) <= 200
    # paths of our machines only in the "Developing featsvm" section
    sections = ("\n" + readme).split("\n## ")
    assert [s.split("\n")[0] for s in sections if "../shared" in s] == ["Developing featsvm"]
