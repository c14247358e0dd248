"""`featsvm evaluate`: class maps, subjects, the subject bootstrap and a CLI run on tiny
generated folders of 'another lab'."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset, make_labelled_cells, random_cell_image
from test_report import make_split

from featsvm.cli import main
from featsvm.config import ConfigError
from featsvm.errors import UsageError
from featsvm.evaluate import (
    collect_labelled,
    external_sets,
    folder_label,
    parse_class_map,
    score_external,
    subject_of,
)
from featsvm.labels import LABELS


def test_class_map_parsing_and_folder_labels() -> None:
    cm = parse_class_map(["all=malignant,hem=benign"])
    assert cm == {"all": "malignant", "hem": "benign"}
    assert parse_class_map(["all=malignant", "hem=benign"]) == cm
    assert folder_label("all", cm) == "malignant" and folder_label("HEM", cm) == "benign"
    assert folder_label("Pro", None) == "pro_b"  # built-in aliases without a map
    assert folder_label("malignant", None) == "malignant"
    assert folder_label("other", cm) is None
    with pytest.raises(UsageError, match="label must be one of"):
        parse_class_map(["all=leukemia"])
    with pytest.raises(UsageError, match="FOLDER=LABEL"):
        parse_class_map(["all"])


def test_collect_labelled_maps_folders_and_ignores_unknown_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ext = tmp_path / "lab"
    for folder in ("all", "hem", "notes"):
        (ext / folder).mkdir(parents=True)
        random_cell_image(rng, 16).save(ext / folder / f"UID_1_1_1_{folder}.png")
    files, ignored = collect_labelled([ext], parse_class_map(["all=malignant,hem=benign"]))
    assert [(f.name, f.label) for f in files] == [
        ("lab/all/UID_1_1_1_all.png", "malignant"), ("lab/hem/UID_1_1_1_hem.png", "benign")]
    assert ignored == [str(ext / "notes")]
    # a DIR that is itself a class folder
    files, _ = collect_labelled([ext / "hem"], {"hem": "benign"})
    assert [f.label for f in files] == ["benign"]
    with pytest.raises(UsageError, match="no labelled images"):
        collect_labelled([ext], {"x": "benign"})


def test_subject_regex() -> None:
    pat = re.compile(r"UID_(H?\d+)_")
    assert subject_of("cnmc/all/UID_16_11_1_all.png", pat) == "16"
    assert subject_of("cnmc/hem/UID_H10_3_2_hem.png", pat) == "H10"
    assert subject_of("x/UID_7_", re.compile(r"UID_\d+")) == "UID_7"  # no group: whole match
    with pytest.raises(UsageError, match="does not match"):
        subject_of("cnmc/all/cell.png", pat)


def test_external_sets_are_validated_like_every_section() -> None:
    doc = {"external": [{"name": "cnmc", "path": "../x", "class_map": {"all": "malignant"},
                         "subject_regex": r"UID_(H?\d+)_"}]}
    (s,) = external_sets(doc)
    assert s.class_map == {"all": "malignant"}
    assert external_sets({"external": {"cnmc": {"path": "../x"}}})[0].name == "cnmc"
    assert external_sets({}) == ()
    with pytest.raises(ConfigError, match="unknown key"):
        external_sets({"external": [{"name": "a", "path": "p", "clas_map": {}}]})
    with pytest.raises(ConfigError, match="expected str"):
        external_sets({"external": [{"name": "a", "path": 3}]})
    with pytest.raises(UsageError, match="label must be one of"):
        external_sets({"external": [{"name": "a", "path": "p", "class_map": {"a": "x"}}]})


def _planted(n_per: int = 25) -> tuple[list[str], np.ndarray, list[str]]:
    """4 patients (2 always called malignant, 2 always benign) and 2 healthy subjects (always
    benign): sensitivity 0.5, but only 4 independent patients behind it."""
    labels, rows, subjects = [], [], []
    mal = [0.05, 0.05, 0.85, 0.05]
    ben = [0.85, 0.05, 0.05, 0.05]
    for s, (lab, p) in enumerate([("malignant", mal), ("malignant", mal), ("malignant", ben),
                                  ("malignant", ben), ("benign", ben), ("benign", ben)]):
        for _ in range(n_per):
            labels.append(lab)
            rows.append(p)
            subjects.append(f"S{s}")
    return labels, np.array(rows), subjects


def test_subject_bootstrap_sees_few_subjects_image_bootstrap_does_not() -> None:
    labels, proba, subjects = _planted()
    by_subject = score_external(labels, proba, subjects, threshold=0.9, n_boot=400, seed=0)
    by_image = score_external(labels, proba, [f"img{i}" for i in range(len(labels))],
                              threshold=0.9, n_boot=400, seed=0, bootstrap_unit="image")
    for m in (by_subject, by_image):
        assert m["own_decision"]["sensitivity"] == 0.5
        assert m["own_decision"]["specificity"] == 1.0
        assert m["task"] == "binary" and m["counts"] == {"malignant": 100, "benign": 50}
        assert m["at_threshold"]["abstention_rate"] == 1.0  # every confidence 0.85 < 0.9
        assert m["at_threshold"]["sensitivity"] is None
    assert by_subject["n_subjects"] == 6 and by_subject["bootstrap"]["unit"] == "subject"
    lo_s, hi_s = by_subject["own_decision"]["ci95"]["sensitivity"]
    lo_i, hi_i = by_image["own_decision"]["ci95"]["sensitivity"]
    # whole subjects move together: sensitivity steps of 1/4 -> an interval reaching 0 and 1
    assert lo_s <= 0.01 and hi_s >= 0.99
    assert 0.35 < lo_i < 0.5 < hi_i < 0.65
    # half the positives above every negative, half tied with them: 0.5 + 0.5 * 0.5
    assert by_subject["roc_auc"] == pytest.approx(0.75)


def test_ood_rate_with_subject_ci_and_per_class() -> None:
    labels, proba, subjects = _planted()
    # every image of S0, S1 (malignant) and S4 (benign) flagged: 3 of 6 subjects, 75 images
    flags = [s in ("S0", "S1", "S4") for s in subjects]
    m = score_external(labels, proba, subjects, None, n_boot=400, seed=0, ood=flags)
    o = m["ood"]
    assert o["available"] is True and o["n_flagged"] == 75
    assert o["rate"] == pytest.approx(0.5)
    assert o["rate_malignant"] == pytest.approx(0.5) and o["rate_benign"] == pytest.approx(0.5)
    lo, hi = o["ci95"]["rate"]
    assert lo < 0.3 and hi > 0.7  # whole subjects move together: a wide interval
    # a run without a flag says so, with the reason given
    m = score_external(labels, proba, subjects, None, n_boot=0, ood=None,
                       ood_unavailable="not available for end-to-end runs")
    assert m["ood"] == {"available": False, "rate": None,
                        "reason": "not available for end-to-end runs"}


def test_ood_in_the_another_lab_tables(tmp_path: Path) -> None:
    from featsvm.evaluation import trust_report as trust

    rows = [{"model": "m", "run_id": "r", "name": "lab", "n_images": 4, "n_subjects": 2,
             "unit": "subject", "roc_auc": 0.5, "roc_auc_ci": None, "sensitivity": 1.0,
             "sensitivity_ci": None, "specificity": 0.0, "specificity_ci": None,
             "precision": 0.5, "thr_sensitivity": None, "thr_specificity": None,
             "abstention": 0.0, "abstention_ci": None, "ece": 0.1,
             "predicted_malignant_share": 1.0, "ood_available": True, "ood_rate": 0.96,
             "ood_ci": [0.9, 1.0], "ood_in_lab": 0.02}]
    text = trust.external_markdown(rows)
    assert "flagged out of distribution" in text and "96.0 % [90.0, 100.0]" in text
    assert "(in-lab test 2.0 %)" in text
    rows[0] |= {"ood_available": False, "ood_rate": None}
    assert "not available" in trust.external_markdown(rows)


def test_four_class_folders_give_the_four_class_block() -> None:
    rng = np.random.default_rng(2)
    labels = [LABELS[i % 4] for i in range(40)]
    logits = rng.normal(0, 1, (40, 4))
    logits[np.arange(40), np.arange(40) % 4] += 2
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = score_external(labels, proba, [str(i % 8) for i in range(40)], None, n_boot=20)
    assert m["task"] == "four_class"
    assert m["four_class"]["n"] == 40 and m["four_class"]["bootstrap"]["unit"] == "subject"
    assert "ece" in m["calibration"]["four_class"]
    assert m["at_threshold"]["threshold"] is None and m["at_threshold"]["abstention_rate"] == 0


@pytest.fixture(scope="module")
def head_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from featsvm.features.extract import extract
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig

    root = tmp_path_factory.mktemp("evaluate")
    data = make_dataset(root / "data", per_class=6, size=40, seed=3)
    split = make_split(data, root / "split.csv")
    extract(data, "efficientnet_lite0", weights="none", cache_dir=root / "cache", batch_size=8,
            workers=0, progress=False)
    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), class_weight=("none",), n_boot=10, n_jobs=1,
                     target_error=0.5)
    return fit("efficientnet_lite0", "logreg", split, cache_dir=root / "cache", weights="none",
               runs_dir=root / "runs", config=cfg, progress=False).path


def test_cli_evaluate_on_tiny_folders(head_run: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    lab = tmp_path / "otherlab"
    for folder, subjects, idx in (("all", ("2", "16"), 2), ("hem", ("H10", "H14"), 0)):
        (lab / folder).mkdir(parents=True)
        for s in subjects:
            for j in range(3):
                random_cell_image(rng, 48, idx).save(lab / folder / f"UID_{s}_{j}_1_{folder}.png")
    (lab / "hem" / "UID_H10_99_1_broken.png").write_bytes(b"not an image")
    args = ["evaluate", "--run", str(head_run), str(lab), "--class-map",
            "all=malignant,hem=benign", "--subject-regex", r"UID_(H?\d+)_", "--name", "lab2",
            "--n-boot", "50", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "bootstrap over subjects" in res.output and "ROC-AUC" in res.output
    out = head_run / "external" / "lab2"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 12 and m["n_subjects"] == 4 and m["bootstrap"]["unit"] == "subject"
    assert m["counts"] == {"malignant": 6, "benign": 6}
    assert m["skipped"] and m["skipped"][0]["file"].endswith("broken.png")
    cfg = json.loads((head_run / "config.json").read_text())
    assert m["at_threshold"]["threshold"] == cfg["abstention"]["threshold"]
    for key in ("sensitivity", "specificity", "precision"):
        assert key in m["own_decision"] and key in m["at_threshold"]
    assert "ece" in m["calibration"]["binary"] and "roc_auc" in m["ci95"]
    # the run's OOD flag on every image: rate with a subject CI, next to the in-lab test rate
    assert "out of distribution:" in res.output and "in-lab test" in res.output
    o = m["ood"]
    assert o["available"] is True and o["threshold"] == cfg["ood"]["threshold"]
    assert o["in_lab_test_rate"] == cfg["ood"]["rate_test"] and "rate" in o["ci95"]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["subject"] for r in rows} == {"2", "16", "H10", "H14"}
    assert all(r["ood"] in ("0", "1") for r in rows)
    assert o["rate"] == pytest.approx(sum(r["ood"] == "1" for r in rows) / 12)
    thr = cfg["abstention"]["threshold"]
    for r in rows:
        assert r["abstain"] == str(int(float(r["confidence"]) < thr - 1e-6)) or \
            abs(float(r["confidence"]) - thr) < 1e-5
    # without a subject regex: said so, in the output and the JSON
    res = CliRunner().invoke(main, ["evaluate", "--run", str(head_run), str(lab),
                                    "--class-map", "all=malignant,hem=benign", "--n-boot", "20",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    assert "no --subject-regex" in res.output
    m = json.loads((head_run / "external" / "otherlab" / "metrics.json").read_text())
    assert m["bootstrap"]["unit"] == "image" and "too narrow" in m["note"]
    # predict marks abstain with the same threshold
    res = CliRunner().invoke(main, ["predict", "--run", str(head_run), str(lab / "all"),
                                    "--out", str(tmp_path / "p.csv"), "--quiet"])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "p.csv", newline="") as f:
        prow = list(csv.DictReader(f))
    assert all(r["abstain"] in ("0", "1") for r in prow)


def test_cli_evaluate_errors_are_one_line(head_run: Path, tmp_path: Path) -> None:
    (tmp_path / "lab" / "x").mkdir(parents=True)
    res = CliRunner().invoke(main, ["evaluate", "--run", str(head_run), str(tmp_path / "lab")])
    assert res.exit_code == 1 and "no labelled images" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--run", str(head_run), str(tmp_path),
                                    "--class-map", "lab=benign", "--subject-regex", "UID_(\\d+"])
    assert res.exit_code == 1 and "not a valid regular expression" in res.output
    # labels from a sheet: a bad line is named once, before any image is looked at
    sheet = tmp_path / "labels.csv"
    sheet.write_text("file,label\nx/a.png,blast\n")
    res = CliRunner().invoke(main, ["evaluate", "--run", str(head_run), str(tmp_path / "lab"),
                                    "--labels", str(sheet)])
    assert res.exit_code == 1 and res.output.count("Error:") == 1
    assert "labels.csv line 2: label 'blast' is neither in the class map" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--run", str(head_run), str(tmp_path / "lab"),
                                    "--labels", str(sheet), "--label-regex", "x"])
    assert res.exit_code == 1 and "--label-regex or --labels, not both" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--run", str(head_run), str(tmp_path / "lab"),
                                    "--labels", str(sheet), "--class-map", "blast=malignant"])
    assert res.exit_code == 1 and "read relative to the DIR" in res.output


def test_heads_of_one_cache_share_embeddings_through_a_memo(head_run: Path,
                                                             tmp_path: Path) -> None:
    """`featsvm run` evaluates every head of a backbone on an external set with one
    EmbeddingMemo: the second head embeds nothing, and its results equal those without it."""
    from featsvm.evaluate import evaluate
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig
    from featsvm.predict import EmbeddingMemo
    from featsvm.runs import PROB_COLUMNS

    root = head_run.parent.parent
    cfg = HeadConfig(cv_folds=2, svm_kernels=("linear",), svm_linear_C=(1.0,),
                     class_weight=("none",), n_boot=10, n_jobs=1, target_error=0.5)
    svm_run = fit("efficientnet_lite0", "svm", root / "split.csv", cache_dir=root / "cache",
                  weights="none", runs_dir=root / "runs", config=cfg, progress=False).path
    lab = make_labelled_cells(tmp_path / "lab", per_class=4, size=48, seed=9)
    kw = {"class_map": {"all": "malignant", "hem": "benign"}, "n_boot": 10, "progress": False}
    memo = EmbeddingMemo()
    shared = [evaluate(run, [lab], name="memo", memo=memo, **kw) for run in (head_run, svm_run)]
    assert memo.hits == 8  # the SVM run found all 8 images embedded by the logistic run
    alone = evaluate(svm_run, [lab], name="alone", **kw)
    probs = []
    for res in (shared[1], alone):
        with open(res.out_dir / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        probs.append([[float(r[c]) for c in PROB_COLUMNS] for r in rows])
    assert len(probs[0]) == len(probs[1]) == 8
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-5)


# ---------------------------------------------------------------- labels outside folder names


def _write_cells(rng: np.random.Generator, folder: Path, names_idx: list[tuple[str, int]]
                 ) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, idx in names_idx:
        random_cell_image(rng, 48, idx).save(folder / name)


def _idb_like(root: Path, seed: int = 11) -> list[tuple[str, int]]:
    """An ALL-IDB2-like set: one folder, the label in the file name (_1 blast, _0 normal);
    the same images in class folders as a second copy (all/, hem/)."""
    rng = np.random.default_rng(seed)
    names = [(f"Im{i:03d}_1.tif", 2) for i in range(1, 4)] + \
        [(f"Im{i:03d}_0.tif", 0) for i in range(4, 8)]
    _write_cells(rng, root / "flat", names)
    for name, _ in names:
        folder = root / "folders" / ("all" if name.endswith("_1.tif") else "hem")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes((root / "flat" / name).read_bytes())
    return names


def test_collect_by_regex_labels_from_file_names_and_lists_the_rest(tmp_path: Path) -> None:
    from featsvm.evaluate import collect_by_regex

    _idb_like(tmp_path)
    rng = np.random.default_rng(0)
    _write_cells(rng, tmp_path / "flat", [("Im999.tif", 0), ("Im050_2.tif", 1)])
    (tmp_path / "flat" / "readme.txt").write_text("not an image")
    cm = parse_class_map(["1=malignant,0=benign"])
    files, unlabelled = collect_by_regex([tmp_path / "flat"], r"_(\d)\.tif$", cm)
    assert [f.label for f in files].count("malignant") == 3
    assert [f.label for f in files].count("benign") == 4
    assert files[0].name == "flat/Im001_1.tif"
    assert unlabelled == [("flat/Im050_2.tif", "class '2' is not in the class map"),
                          ("flat/Im999.tif", "path does not match the label regex")]
    # the regex sees the path inside DIR, so a class folder works as well (whole match)
    files, _ = collect_by_regex([tmp_path / "folders"], r"all|hem",
                                {"all": "malignant", "hem": "benign"})
    assert len(files) == 7 and files[0].name == "folders/all/Im001_1.tif"
    with pytest.raises(UsageError, match=r"no labelled images.*label regex.*e\.g\. 'Im001"):
        collect_by_regex([tmp_path / "flat"], r"_([ab])\.tif$", cm)
    with pytest.raises(UsageError, match="not a valid regular expression"):
        collect_by_regex([tmp_path / "flat"], r"_([01]\.tif$", cm)
    # folder labels only: the flat folder has no class folders -> the hint names --label-regex
    with pytest.raises(UsageError, match="--label-regex"):
        collect_labelled([tmp_path / "flat"], cm)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_csv_is_checked_line_by_line(tmp_path: Path) -> None:
    from featsvm.evaluate import collect_from_csv, read_labels_csv

    _idb_like(tmp_path)
    cm = {"ALL": "malignant", "HEM": "benign"}
    # Excel's BOM and semicolons, upper-case header, a blank row, Windows separators
    sheet = read_labels_csv(_csv(tmp_path / "ok.csv", "\ufeffFile;Label;Subject\n"
                                 "Im001_1.tif;ALL;P1\n.\\Im002_1.tif;ALL;P1\n;;\n"
                                 "Im004_0.tif;benign;H1\nIm404_0.tif;HEM;H1\n"), cm)
    assert sheet.has_subject and len(sheet.sha256) == 64
    assert [(r.line, r.file, r.label, r.subject) for r in sheet.rows] == [
        (2, "Im001_1.tif", "malignant", "P1"), (3, "Im002_1.tif", "malignant", "P1"),
        (5, "Im004_0.tif", "benign", "H1"), (6, "Im404_0.tif", "benign", "H1")]
    files, unlabelled, not_found = collect_from_csv([tmp_path / "flat"], sheet)
    assert [(f.name, f.label, f.subject) for f in files] == [
        ("flat/Im001_1.tif", "malignant", "P1"), ("flat/Im002_1.tif", "malignant", "P1"),
        ("flat/Im004_0.tif", "benign", "H1")]
    assert not_found == [("flat/Im404_0.tif",
                          f"ok.csv line 6: no such file under {tmp_path / 'flat'}")]
    assert [n for n, _ in unlabelled] == ["flat/Im003_1.tif", "flat/Im005_0.tif",
                                          "flat/Im006_0.tif", "flat/Im007_0.tif"]
    assert {why for _, why in unlabelled} == {"not in ok.csv"}
    # paths are relative to the DIR: the wrong folder is refused, saying so
    with pytest.raises(UsageError, match="relative to the DIR"):
        collect_from_csv([tmp_path], sheet)
    with pytest.raises(UsageError, match="exactly one DIR"):
        collect_from_csv([tmp_path / "flat", tmp_path / "folders"], sheet)
    bad = {
        "file,class\na.tif,ALL\n": "line 1: the header needs the columns file and label",
        "file,label\na.tif,ALL\nb.tif,blast\n": r"line 3: label 'blast' is neither in the "
                                                r"class map.*--class-map blast=malignant",
        "file,label\na.tif,ALL\n./a.tif,HEM\n": "line 3: file 'a.tif' is already on line 2",
        "file,label\na.tif,\n": "line 2: the label cell is empty",
        "file,label,subject\na.tif,ALL,\n": "line 2: the subject cell is empty",
        "file,label\n../a.tif,ALL\n": "line 2: file '../a.tif' must be a path relative",
        "file,label\n/x/a.tif,ALL\n": "line 2: file '/x/a.tif' must be a path relative",
        "file,label\n": "no rows after the header",
    }
    for text, msg in bad.items():
        with pytest.raises(UsageError, match=msg):
            read_labels_csv(_csv(tmp_path / "bad.csv", text), cm)
    with pytest.raises(UsageError, match="not found"):
        read_labels_csv(tmp_path / "nope.csv", cm)


def test_external_sets_take_a_label_regex_or_a_labels_file() -> None:
    (s,) = external_sets({"external": [{"name": "idb", "path": "x",
                                        "label_regex": r"_([01])\.tif$",
                                        "class_map": {"1": "malignant", "0": "benign"}}]})
    assert s.label_regex == r"_([01])\.tif$" and s.labels == ""
    assert external_sets({"external": {"s": {"path": "x", "labels": "l.csv"}}})[0].labels
    with pytest.raises(ConfigError, match="not both"):
        external_sets({"external": [{"name": "a", "path": "p", "labels": "l.csv",
                                     "label_regex": "x"}]})
    with pytest.raises(UsageError, match="label regex"):
        external_sets({"external": [{"name": "a", "path": "p", "label_regex": "(x"}]})


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_cli_label_regex_reads_a_flat_folder_like_class_folders(head_run: Path,
                                                                 tmp_path: Path) -> None:
    """ALL-IDB2 layout through the CLI: the same counts and numbers as the same images in
    class folders; the files the regex does not match are counted, listed and warned about."""
    from featsvm.evaluation import trust_report as trust
    from featsvm.runs import read_run

    _idb_like(tmp_path)
    rng = np.random.default_rng(1)
    _write_cells(rng, tmp_path / "flat", [("Im999.tif", 0)])
    base = ["evaluate", "--run", str(head_run), "--n-boot", "30", "--quiet"]
    res = CliRunner().invoke(main, [*base, str(tmp_path / "flat"), "--label-regex",
                                    r"_([01])\.tif$", "--class-map", "1=malignant,0=benign",
                                    "--name", "idb"])
    assert res.exit_code == 0, res.output
    assert "3 malignant, 4 benign" in res.output
    assert "warning: 1 image file(s) without a label left out" in res.output
    assert "flat/Im999.tif (path does not match the label regex)" in res.output
    flat = _metrics(head_run / "external" / "idb")
    assert flat["label_regex"] == r"_([01])\.tif$" and flat["labels"] is None
    assert flat["unlabelled"] == [{"file": "flat/Im999.tif",
                                   "reason": "path does not match the label regex"}]
    (tmp_path / "flat" / "Im999.tif").unlink()
    res = CliRunner().invoke(main, [*base, str(tmp_path / "folders"), "--class-map",
                                    "all=malignant,hem=benign", "--name", "folders"])
    assert res.exit_code == 0, res.output
    folders = _metrics(head_run / "external" / "folders")
    assert folders["label_regex"] is None and folders["unlabelled"] == []
    for key in ("n_images", "counts", "n_subjects", "roc_auc", "own_decision", "at_threshold",
                "calibration", "ood", "ci95", "predicted_malignant_share"):
        assert flat[key] == folders[key], key
    # the report's "Another lab" tables read it like any other set
    rows = trust.external_rows([read_run(head_run)])
    assert "idb: 7 images" in trust.external_markdown(rows["idb"])
    # nothing matches: the one-line error with the hint
    res = CliRunner().invoke(main, [*base, str(tmp_path / "flat"), "--label-regex", "_x",
                                    "--class-map", "1=malignant"])
    assert res.exit_code == 1 and "no labelled images" in res.output
    assert "--label-regex" in res.output and "Traceback" not in res.output


def test_labels_csv_with_subjects_gives_a_subject_bootstrap(head_run: Path,
                                                            tmp_path: Path) -> None:
    from featsvm.evaluate import ExternalSet, evaluate, evaluate_set, is_current

    _idb_like(tmp_path)
    rows = ["file,label,subject"] + [
        f"Im{i:03d}_{c}.tif,{'blast' if c else 'normal'},{s}" for i, c, s in (
            (1, 1, "P1"), (2, 1, "P1"), (3, 1, "P2"), (4, 0, "H1"), (5, 0, "H1"),
            (6, 0, "H2"))] + ["Im900_0.tif,normal,H2"]
    sheet = _csv(tmp_path / "labels.csv", "\n".join(rows) + "\n")
    cm = {"blast": "malignant", "normal": "benign"}
    out = evaluate(head_run, [tmp_path / "flat"], class_map=cm, labels_csv=sheet, name="sheet",
                   n_boot=30, progress=False)
    m = out.metrics
    assert m["bootstrap"]["unit"] == "subject" and m["n_subjects"] == 4
    assert m["counts"] == {"malignant": 3, "benign": 3}
    assert "subject column" in m["note"]
    assert m["labels"]["file"] == str(sheet) and m["labels"]["subject_column"] is True
    assert m["unlabelled"] == [{"file": "flat/Im007_0.tif", "reason": "not in labels.csv"}]
    assert [r["file"] for r in m["not_found"]] == ["flat/Im900_0.tif"]
    assert "line 8" in m["not_found"][0]["reason"]
    with open(out.out_dir / "predictions.csv", newline="") as f:
        assert [r["subject"] for r in csv.DictReader(f)] == ["P1", "P1", "P2", "H1", "H1",
                                                              "H2"]
    # a subject column and a subject regex: which one? refused
    with pytest.raises(UsageError, match="subject column: leave out --subject-regex"):
        evaluate(head_run, [tmp_path / "flat"], class_map=cm, labels_csv=sheet,
                 subject_regex=r"Im(\d)", progress=False)
    with pytest.raises(UsageError, match="not both"):
        evaluate(head_run, [tmp_path / "flat"], class_map=cm, labels_csv=sheet,
                 label_regex="x", progress=False)
    # the study's skip test sees a changed sheet or regex as a different evaluation
    ext = ExternalSet("sheet2", str(tmp_path / "flat"), cm, labels=str(sheet))
    assert not is_current(head_run, ext)
    evaluate_set(head_run, ext, n_boot=0, progress=False)
    assert is_current(head_run, ext)
    sheet.write_text(sheet.read_text().replace("P2", "P3"))
    assert not is_current(head_run, ext)
    regex = ExternalSet("idb2", str(tmp_path / "flat"), {"1": "malignant", "0": "benign"},
                        label_regex=r"_([01])\.tif$")
    evaluate_set(head_run, regex, n_boot=0, progress=False)
    assert is_current(head_run, regex)
    assert not is_current(head_run, ExternalSet(
        "idb2", regex.path, regex.class_map, label_regex=r"_(1|0)\.tif$"))
    assert not is_current(head_run, ExternalSet("idb2", regex.path, regex.class_map))
