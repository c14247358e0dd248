"""`featsvm ensemble`: the mean of its members' probabilities, scored by the members' own code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_dataset
from test_report import make_split, write_fake_run

from featsvm.cli import main
from featsvm.data.manifest import read_manifest
from featsvm.ensemble import any_member_flags, make_ensemble, member_records
from featsvm.errors import EnsembleError
from featsvm.evaluation.metrics import score_block
from featsvm.evaluation.selective import choose_threshold
from featsvm.labels import LABELS
from featsvm.predict import PredictError, Predictor
from featsvm.runs import (
    finish_run,
    is_pooled_cv,
    list_runs,
    new_run_dir,
    read_run,
    versions,
    write_sidecar,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two head runs (logreg, svm) and three cv runs (logreg and svm with 3 folds, logreg
    with 2) on one tiny cache."""
    from featsvm.features.extract import extract
    from featsvm.models.cv import cross_validate
    from featsvm.models.fit import fit
    from featsvm.models.heads import HeadConfig

    root = tmp_path_factory.mktemp("ensemble")
    data = make_dataset(root / "data", per_class=6, size=40, seed=5)
    split = make_split(data, root / "split.csv")
    cache = root / "cache"
    extract(data, "efficientnet_lite0", weights="none", cache_dir=cache, batch_size=8,
            workers=0, progress=False)
    cfg = HeadConfig(cv_folds=2, logreg_C=(1.0,), svm_kernels=("linear",), svm_linear_C=(0.1,),
                     class_weight=("none",), n_boot=20, n_jobs=1)
    out: dict[str, Path] = {"root": root, "data": data, "split": split, "runs": root / "runs"}
    for head in ("logreg", "svm"):
        out[head] = fit("efficientnet_lite0", head, split, cache_dir=cache, weights="none",
                        runs_dir=root / "runs", config=cfg, progress=False).path
        out[f"cv_{head}"] = cross_validate("efficientnet_lite0", head, split, cache_dir=cache,
                                           weights="none", runs_dir=root / "runs", config=cfg,
                                           folds=3, progress=False).path
    out["cv_2folds"] = cross_validate("efficientnet_lite0", "logreg", split, cache_dir=cache,
                                      weights="none", runs_dir=root / "runs", config=cfg,
                                      folds=2, progress=False).path
    return out


def _hand_mean(a: Path, b: Path) -> tuple[list[str], np.ndarray]:
    """The two runs' probabilities matched by sha256 (in a's order) and averaged by hand."""
    pa, pb = read_run(a).predictions(), read_run(b).predictions()
    at = {s: i for i, s in enumerate(pb.sha256)}
    return pa.sha256, (pa.proba + pb.proba[[at[s] for s in pa.sha256]]) / 2


def _in_order(rec, shas: list[str]) -> np.ndarray:
    p = rec.predictions()
    at = {s: i for i, s in enumerate(p.sha256)}
    return p.proba[[at[s] for s in shas]]


def test_cv_ensemble_is_the_mean_scored_as_cv_runs_are(tiny: dict[str, Path]) -> None:
    rec = make_ensemble([tiny["cv_logreg"], tiny["cv_svm"]], runs_dir=tiny["runs"])
    c = rec.config
    assert c["kind"] == "ensemble" and c["members_kind"] == "cv"
    assert is_pooled_cv(c)  # the report's pooled-CV table, like a cv run
    assert c["combine"] == "mean of class probabilities"
    assert c["model"] == ("ensemble(efficientnet_lite0 + logreg, efficientnet_lite0 + svm)")
    assert [m["run_id"] for m in c["members"]] == [tiny["cv_logreg"].name, tiny["cv_svm"].name]
    assert all(len(m["config_sha256"]) == 64 and len(m["model_sha256"]) == 64
               for m in c["members"])
    shas, mean = _hand_mean(tiny["cv_logreg"], tiny["cv_svm"])
    np.testing.assert_allclose(_in_order(rec, shas), mean, atol=1e-6)  # csv keeps 6 decimals
    pred = rec.predictions()
    assert set(pred.split) == {"pooled"}
    assert pred.fold == read_run(tiny["cv_logreg"]).predictions().fold
    assert pred.pred_label == [LABELS[i] for i in pred.proba.argmax(axis=1)]
    man = {r.sha256: r for r in read_manifest(tiny["split"]).rows}
    expected = score_block([man[s].label for s in shas], mean, [man[s].group for s in shas],
                           n_boot=20, seed=0)
    got = rec.metrics["pooled"]
    assert got["confusion_matrix"] == expected["confusion_matrix"]
    for key in ("accuracy", "macro_f1", "roc_auc_ovr"):
        assert got[key] == pytest.approx(expected[key])
    assert got["ci95"]["accuracy"] == pytest.approx(expected["ci95"]["accuracy"])
    assert len(rec.metrics["folds"]) == 3 and "accuracy" in rec.metrics["fold_spread"]
    assert set(rec.metrics["folds"][0]["members"]) == {tiny["cv_logreg"].name,
                                                        tiny["cv_svm"].name}
    with pytest.raises(PredictError, match="cross-validation"):
        Predictor.from_run(rec.path)


def test_head_ensemble_scores_val_and_test_and_chooses_its_own_threshold(
        tiny: dict[str, Path]) -> None:
    rec = make_ensemble([tiny["logreg"], tiny["svm"]], runs_dir=tiny["runs"], name="heads")
    assert rec.run_id.startswith("heads-") and rec.config["members_kind"] == "deployable"
    assert not is_pooled_cv(rec.config)
    shas, mean = _hand_mean(tiny["logreg"], tiny["svm"])
    np.testing.assert_allclose(_in_order(rec, shas), mean, atol=1e-6)
    pred = read_run(tiny["logreg"]).predictions()
    man = {r.sha256: r for r in read_manifest(tiny["split"]).rows}
    for split in ("val", "test"):
        idx = [i for i, s in enumerate(pred.split) if s == split]
        expected = score_block([man[shas[i]].label for i in idx], mean[idx],
                               [man[shas[i]].group for i in idx], n_boot=20, seed=0)
        assert rec.metrics[split]["confusion_matrix"] == expected["confusion_matrix"]
        assert rec.metrics[split]["roc_auc_ovr"] == pytest.approx(expected["roc_auc_ovr"])
    val = [i for i, s in enumerate(pred.split) if s == "val"]
    t = np.array([LABELS.index(man[shas[i]].label) for i in val])
    choice = choose_threshold(mean[val].max(axis=1), mean[val].argmax(axis=1) == t,
                              rec.config["abstention"]["target_error"])
    assert rec.config["abstention"]["threshold"] == pytest.approx(choice["threshold"])
    assert "selective" in rec.metrics and "calibration" in rec.metrics


def test_predict_on_a_head_ensemble_is_the_mean_of_its_members(tiny: dict[str, Path]) -> None:
    rec = make_ensemble([tiny["logreg"], tiny["svm"]], runs_dir=tiny["runs"])
    files = sorted((tiny["data"] / "Original" / "Pre").iterdir())[:4]
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in files]
    ens = Predictor.from_run(rec.path)
    a, b = Predictor.from_run(tiny["logreg"]), Predictor.from_run(tiny["svm"])
    np.testing.assert_allclose(ens.predict_proba(images),
                               (a.predict_proba(images) + b.predict_proba(images)) / 2, atol=1e-9)
    p, flags = ens.predict_with_ood(images)
    _, fa = a.predict_with_ood(images)
    _, fb = b.predict_with_ood(images)
    assert flags == [x or y for x, y in zip(fa, fb, strict=True)]
    assert rec.config["ood"]["members"] == [tiny["logreg"].name, tiny["svm"].name]
    # what predict writes for the ensemble's own val/test images is its predictions.csv
    own = rec.predictions()
    from featsvm.predict import predict

    res = predict(rec.path, [tiny["data"] / r for r in own.relpath[:5]], data_root=tiny["data"],
                  progress=False)
    got = {x.file: x for x in res.predictions}
    for i, rel in enumerate(own.relpath[:5]):
        np.testing.assert_allclose(got[rel].proba, own.proba[i], atol=1e-4)
        assert got[rel].abstain is not None
    out = tiny["root"] / "ens-preds.csv"
    cli = CliRunner().invoke(main, ["predict", "--run", str(rec.path), *map(str, files),
                                    "--out", str(out), "--quiet"])
    assert cli.exit_code == 0, cli.output
    assert rec.config["model"] in cli.output and out.is_file()
    assert "flagged by any member" in cli.output  # the OOD line names the ensemble's rule


def test_evaluate_on_a_head_ensemble(tiny: dict[str, Path], tmp_path: Path) -> None:
    from conftest import make_labelled_cells

    from featsvm.evaluate import evaluate

    rec = make_ensemble([tiny["logreg"], tiny["svm"]], runs_dir=tiny["runs"])
    lab = make_labelled_cells(tmp_path / "lab", per_class=3, size=40, seed=4)
    res = evaluate(rec.path, [lab], class_map={"all": "malignant", "hem": "benign"},
                   n_boot=10, progress=False)
    assert res.metrics["model"] == rec.config["model"] and res.metrics["n_images"] == 6
    assert res.metrics["ood"]["available"]
    assert res.metrics["at_threshold"]["threshold"] == rec.config["abstention"]["threshold"]


def test_any_member_flags() -> None:
    assert any_member_flags([[True, False, False, None], [False, False, None, None]]) == [
        True, False, False, None]
    assert any_member_flags([[None, None], [True, False]]) == [True, False]


def test_refusals(tiny: dict[str, Path]) -> None:
    with pytest.raises(EnsembleError, match="fold"):
        make_ensemble([tiny["cv_logreg"], tiny["cv_2folds"]], runs_dir=tiny["runs"])
    with pytest.raises(EnsembleError, match="all cross-validation runs"):
        make_ensemble([tiny["cv_logreg"], tiny["logreg"]], runs_dir=tiny["runs"])
    with pytest.raises(EnsembleError, match="given twice"):
        make_ensemble([tiny["logreg"], tiny["logreg"]], runs_dir=tiny["runs"])
    with pytest.raises(EnsembleError, match="at least two"):
        make_ensemble([tiny["logreg"]], runs_dir=tiny["runs"])
    ens = make_ensemble([tiny["logreg"], tiny["svm"]], runs_dir=tiny["runs"])
    with pytest.raises(EnsembleError, match="itself an ensemble"):
        make_ensemble([ens.path, tiny["logreg"]], runs_dir=tiny["runs"])


def _fake_without_last_test_image(runs: Path, split: Path) -> tuple[Path, str]:
    man = read_manifest(split)
    scored = [r for r in man.rows if r.split in ("val", "test")]
    dropped = scored.pop()
    run_dir = new_run_dir(runs, "partial")
    (run_dir / "model.pt").write_bytes(b"not a model")
    write_sidecar(run_dir / "model.pt")
    proba = np.full((len(scored), len(LABELS)), 0.25)
    finish_run(run_dir, {
        "run_id": run_dir.name, "kind": "end_to_end", "model": "partial", "backbone": None,
        "head": None, "weights": {"label": "none", "sha256": None}, "preprocessing": {},
        "split": {"path": str(split), "sha256": man.sha256}, "seed": 0,
        "model_file": "model.pt", "timing": {}, "versions": versions(), "created": "now"},
        {}, scored, proba)
    return run_dir, dropped.relpath


def test_members_must_score_the_same_images_of_the_same_manifest(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    split = make_split(data, tmp_path / "split.csv")
    runs = tmp_path / "runs"
    full = write_fake_run(runs, split, model="vgg16 + svm", seed=1)
    partial, missing = _fake_without_last_test_image(runs, split)
    with pytest.raises(EnsembleError, match=f"image {missing} .*scored by {full.name} but not "
                                            f"by {partial.name}"):
        make_ensemble([full, partial], runs_dir=runs)
    other = make_split(data, tmp_path / "other.csv")
    (tmp_path / "other.csv").write_text(other.read_text() + "\n")  # another sha256
    moved = write_fake_run(tmp_path / "runs2", other, model="alexnet + svm", seed=2)
    with pytest.raises(EnsembleError, match="same split manifest"):
        make_ensemble([full, moved], runs_dir=runs)


def test_a_changed_member_is_refused_when_loading(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    split = make_split(data, tmp_path / "split.csv")
    runs = tmp_path / "runs"
    a = write_fake_run(runs, split, model="vgg16 + svm", seed=1)
    b = write_fake_run(runs, split, model="alexnet + svm", backbone="alexnet", seed=2)
    ens = make_ensemble([a.name, b.name], runs_dir=runs)  # run ids under --runs
    assert [m.run_id for m in member_records(ens)] == [a.name, b.name]
    cfg = json.loads((b / "config.json").read_text())
    cfg["seed"] = 99
    (b / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EnsembleError, match="another config.json"):
        member_records(read_run(ens.path))


def test_cli_and_report(tmp_path: Path) -> None:
    from featsvm.evaluation.report import write_report

    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    split = make_split(data, tmp_path / "split.csv")
    runs = tmp_path / "runs"
    a = write_fake_run(runs, split, model="vgg16 + svm", seed=1)
    b = write_fake_run(runs, split, model="basic-cnn", kind="end_to_end", backbone=None,
                       head=None, seed=2, weights={"label": "none", "sha256": None})
    res = CliRunner().invoke(main, ["ensemble", str(a), str(b), "--runs", str(runs), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "ensemble(vgg16 + svm, basic-cnn): mean of class probabilities of 2 runs" in res.output
    assert "abstention: confidence <" in res.output and "run record:" in res.output
    bad = CliRunner().invoke(main, ["ensemble", str(a), "--runs", str(runs)])
    assert bad.exit_code == 1 and bad.output.startswith("Error: an ensemble needs")
    rep = write_report(runs, tmp_path / "report")
    table = json.loads((rep.out_dir / "table.json").read_text())
    models = [r["model"] for r in table["rows"]]
    assert "ensemble(vgg16 + svm, basic-cnn)" in models


def test_the_shortcut_check_sets_an_ensemble_beside_its_members_baselines(tmp_path: Path) -> None:
    """An ensemble of logistic heads is compared with the logistic colour baseline (paired
    difference on the same images); one of mixed heads with none."""
    from featsvm.evaluation.shortcut import shortcut_rows

    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    split = make_split(data, tmp_path / "split.csv")
    runs = tmp_path / "runs"
    a = write_fake_run(runs, split, model="vgg16 + logreg", head="logreg", seed=1)
    b = write_fake_run(runs, split, model="alexnet + logreg", backbone="alexnet",
                       head="logreg", seed=2)
    c = write_fake_run(runs, split, model="alexnet + svm", backbone="alexnet", seed=3)
    write_fake_run(runs, split, model="colour_stats + logreg", backbone="colour_stats",
                   head="logreg", seed=4, skill=0.5)
    same = make_ensemble([a, b], runs, name="same")
    mixed = make_ensemble([a, c], runs, name="mixed")
    rows, _ = shortcut_rows(list_runs(runs)[0], "test", n_boot=20)
    by_id = {r.run_id: r for r in rows}
    assert by_id[same.run_id].head == "logreg"
    assert by_id[same.run_id].versus["colour_stats"] is not None
    assert by_id[mixed.run_id].versus["colour_stats"] is None


def test_byte_identical_files_at_two_paths_stay_two_rows(tmp_path: Path) -> None:
    """The release has byte-identical files at two paths, some with different labels: the
    ensemble keeps both rows, each with its own path, label and members' probabilities."""
    import shutil

    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    folders = sorted(p for p in (data / "Original").iterdir() if p.is_dir())
    src = next((folders[0]).glob("*-004.jpg"))
    dst = next((folders[1]).glob("*-005.jpg"))
    shutil.copyfile(src, dst)  # the same bytes, another class, both in test
    split = make_split(data, tmp_path / "split.csv")
    man = read_manifest(split)
    runs = tmp_path / "runs"
    a = write_fake_run(runs, split, model="vgg16 + logreg", head="logreg", seed=1)
    b = write_fake_run(runs, split, model="alexnet + logreg", backbone="alexnet",
                       head="logreg", seed=2)
    ens = make_ensemble([a, b], runs, name="dups").predictions()
    assert len(set(ens.relpath)) == len(ens.relpath)
    label = {r.relpath: r.label for r in man.rows}
    rel_src, rel_dst = (p.relative_to(data).as_posix() for p in (src, dst))
    assert {rel_src, rel_dst} <= set(ens.relpath) and label[rel_src] != label[rel_dst]
    assert [label[r] for r in ens.relpath] == list(ens.true_label)
    pa, pb = read_run(a).predictions(), read_run(b).predictions()
    for rel in (rel_src, rel_dst):
        want = (pa.proba[list(pa.relpath).index(rel)] + pb.proba[list(pb.relpath).index(rel)]) / 2
        np.testing.assert_allclose(ens.proba[list(ens.relpath).index(rel)], want, atol=1e-6)


def test_the_shortcut_check_pairs_each_model_with_the_baseline_of_its_view(
        tmp_path: Path) -> None:
    """A cell-view model is set beside the colour statistics of the cells, a whole-field model
    beside those of the field; a model whose view has no baseline gets none."""
    from featsvm.evaluation.shortcut import shortcut_rows

    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    split = make_split(data, tmp_path / "split.csv")
    runs = tmp_path / "runs"
    cells = {"preprocessing": {"input_size": 224, "view": "cells"}}
    field_run = write_fake_run(runs, split, model="vgg16 + logreg", head="logreg", seed=1)
    cell_run = write_fake_run(runs, split, model="vgg16<cells> + logreg", head="logreg",
                              seed=2, extra=cells)
    grey = write_fake_run(runs, split, model="vgg16<cells+grey> + logreg", head="logreg",
                          seed=5, extra={"preprocessing": {"input_size": 224, "view": "tiles"}})
    write_fake_run(runs, split, model="colour_stats + logreg", backbone="colour_stats",
                   head="logreg", seed=3, skill=0.2)
    write_fake_run(runs, split, model="colour_stats<cells> + logreg", backbone="colour_stats",
                   head="logreg", seed=4, skill=4.0, extra=cells)
    rows, _ = shortcut_rows(list_runs(runs)[0], "test", n_boot=20)
    by_id = {r.run_id: r for r in rows}
    b_field = by_id[field_run.name].versus["colour_stats"]["b"]
    b_cells = by_id[cell_run.name].versus["colour_stats"]["b"]
    assert b_cells > b_field  # the cells baseline was made better (skill 4.0 vs 0.2)
    assert by_id[grey.name].versus["colour_stats"] is None


def test_another_lab_table_tells_two_runs_of_one_model_apart(tmp_path: Path) -> None:
    """Two runs with the same model name evaluated on the same external set get the run id's
    date-time in their "Another lab" label (as the in-lab tables do)."""
    from featsvm.evaluation.trust_report import external_rows

    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    split = make_split(data, tmp_path / "split.csv")
    runs = tmp_path / "runs"
    paths = [write_fake_run(runs, split, model="efficientnet_lite0 (fine-tuned)",
                            kind="end_to_end", head=None, seed=s) for s in (1, 2)]
    paths.append(write_fake_run(runs, split, model="vgg16 + svm", seed=3))
    for p in paths:
        (p / "external" / "lab").mkdir(parents=True)
        (p / "external" / "lab" / "metrics.json").write_text('{"roc_auc": 0.5}')
    rows = external_rows(list_runs(runs)[0])["lab"]
    labels = {r["run_id"]: r["model"] for r in rows}
    assert labels[paths[2].name] == "vgg16 + svm"
    twins = [labels[p.name] for p in paths[:2]]
    assert len(set(twins)) == 2
    assert all(t.startswith("efficientnet_lite0 (fine-tuned) (") for t in twins)
