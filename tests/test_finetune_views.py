"""`featsvm finetune --view cells` (and --stain / --colour, HED stain jitter) on tiny generated
fields: trained on the cells, an image's probabilities the mean of its cells', and predict /
evaluate of the run use the same view."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_cells import field

from featsvm import runs
from featsvm.data.dataset import scan
from featsvm.data.manifest import ManifestRow, write_manifest
from featsvm.features.preprocess import ImageOptions, resolve_options
from featsvm.models import finetune as ft
from featsvm.models import pixels as px

TINY = ft.FinetuneConfig(
    epochs=2, batch_size=8, basic_cnn_size=32, basic_cnn_channels=(8, 16),
    basic_cnn_dense=16, lr=3e-3, warmup_epochs=0.5, n_boot=10, channels_last=False,
    workers=1, device="cpu",
)
FOLDERS = ("Benign", "Early", "Pre", "Pro")


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 classes x 5 fields of 96 px with one to three purple 'white cells' (one field of each
    class has none): 3 train, 1 val, 1 test per class."""
    root = tmp_path_factory.mktemp("ftcells")
    rng = np.random.default_rng(4)
    for c, folder in enumerate(FOLDERS):
        (root / "data" / folder).mkdir(parents=True)
        for j in range(5):
            n = 0 if j == 4 else 1 + (j + c) % 3
            blobs = [(float(rng.uniform(15, 80)), float(rng.uniform(15, 80)),
                      float(rng.uniform(6, 9))) for _ in range(n)]
            field(blobs, size=96, seed=10 * c + j, red_cells=6).save(
                root / "data" / folder / f"f{j}.png")
    rows = []
    for i, rec in enumerate(scan(root / "data").records):
        j = int(Path(rec.relpath).stem[1:])
        split = "train" if j < 3 else ("val" if j == 3 else "test")
        rows.append(ManifestRow(rec.relpath, rec.sha256, rec.label, i, split))
    write_manifest(root / "split.csv", rows)
    return root / "data", root / "split.csv"


def test_pool_rows_means_each_images_inputs():
    v = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.6, 0.4]])
    out = px.pool_rows(v, np.array([0, 0, 1, 2]), 3)
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    assert px.pool_rows(v, None, 4) is v


def test_finetune_on_cells_then_predict_and_evaluate_use_the_cell_view(fields, tmp_path):
    from featsvm.evaluate import evaluate
    from featsvm.predict import predict

    data, split = fields
    cfg = dataclasses.replace(TINY, input="cells")
    res = ft.finetune(data, split, cfg, runs_dir=tmp_path / "runs", resume=False,
                      progress=False)
    rec = runs.read_run(res.run_dir)
    pre = rec.config["preprocessing"]
    # the basic CNN's fixed input size sets the crop size; recorded like extract records it
    assert pre["view"] == "cells" and pre["cell_size"] == 32 and pre["max_cells"] == 12
    assert "mean of its cells'" in rec.config["inputs"]
    n_img, n_in = rec.config["n_images"], rec.config["n_inputs"]
    assert n_img == {"train": 12, "val": 4, "test": 4}
    assert n_in["train"] > n_img["train"]  # fields with two or three cells give more inputs
    # another input, another run: the fingerprint holds the image options
    from featsvm.features.key import WeightsId

    plain = ft.fingerprint(TINY, rec.config["split"]["sha256"],
                           WeightsId.from_json(rec.config["weights"]), data)
    assert rec.config["fingerprint"] != plain
    # predict (cells -> mean of the cells' probabilities -> the run's temperature) reproduces
    # the run's own test predictions
    own = rec.predictions().select("test")
    got = predict(res.run_dir, [data / r for r in own.relpath], data_root=data,
                  progress=False)
    by = {p.file: p.proba for p in got.predictions}
    np.testing.assert_allclose(np.stack([by[r] for r in own.relpath]), own.proba, atol=2e-5)
    # its OOD flag is fitted on the mean of the cells' penultimate-layer embeddings, and
    # predict pools them the same way: the run's own test images flag at its recorded rate
    ood = rec.config["ood"]
    assert "mean over the image's cells" in ood["embedding"]
    assert np.mean([p.ood for p in got.predictions]) == pytest.approx(ood["rate_test"])
    # evaluate on segmented single cells (one cell on black each): one input per image, and
    # the OOD rate of the run's flag
    lab = tmp_path / "lab"
    for folder, s in (("all", "1"), ("hem", "H2")):
        (lab / folder).mkdir(parents=True)
        for k in range(3):
            img = np.zeros((60, 60, 3), np.uint8)
            yy, xx = np.mgrid[0:60, 0:60]
            img[(yy - 30) ** 2 + (xx - 28 - k) ** 2 < 18 ** 2] = (110, 50, 150)
            from PIL import Image

            Image.fromarray(img).save(lab / folder / f"UID_{s}_{k}_1_{folder}.png")
    out = evaluate(res.run_dir, [lab], class_map={"all": "malignant", "hem": "benign"},
                   subject_regex=r"UID_(H?\d+)_", n_boot=10, progress=False)
    assert out.metrics["n_images"] == 6
    assert out.metrics["ood"]["available"] is True
    assert out.metrics["ood"]["in_lab_test_rate"] == ood["rate_test"]


def test_cell_inputs_are_decoded_per_cell_with_their_image_label(fields):
    from featsvm.data.manifest import read_manifest
    from featsvm.models.networks import build_model, normaliser_for

    data, split = fields
    built = build_model("basic-cnn", TINY, options=ImageOptions(view="cells"))
    nz = normaliser_for(built.preprocessing)
    rows = read_manifest(split).subset("train")
    images, skipped = px.preload(data, rows, built.transform, nz, workers=1, progress=False)
    assert not skipped and len(images) == len(rows)
    assert images.owner is not None and images.n_inputs == len(images.owner)
    assert tuple(images.pixels.shape[1:]) == (3, 32, 32)
    # every input carries its image's label; a field without a cell is one input
    assert torch.equal(images.targets, images.image_targets[images.owner])
    counts = torch.bincount(images.owner, minlength=len(rows))
    assert int(counts.min()) >= 1 and int(counts.max()) <= 12


def test_cli_finetune_with_cells_stain_and_hed_jitter(fields, tmp_path):
    from featsvm.cli import main

    data, split = fields
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        "[finetune]\nbatch_size = 8\nbasic_cnn_size = 32\nbasic_cnn_channels = [8]\n"
        "basic_cnn_dense = 8\nn_boot = 5\nchannels_last = false\n", encoding="utf-8")
    result = CliRunner().invoke(main, [
        "finetune", str(data), "--split", str(split), "--model", "basic-cnn", "--epochs", "1",
        "--view", "cells", "--stain", "reinhard", "--colour", "grey", "--stain-jitter", "0.05",
        "--cell-resolution", "16",
        "--runs", str(tmp_path / "runs"), "--config", str(toml), "--quiet", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "input:      view cells" in result.output and "stain reinhard" in result.output
    (run,), _ = runs.list_runs(tmp_path / "runs")
    pre = run.config["preprocessing"]
    assert pre["view"] == "cells" and pre["stain"] == "reinhard" and pre["colour"] == "grey"
    assert pre["cell_resolution"] == 16 and "resolution-normalised to 16 px" in result.output
    # the Reinhard reference comes from the split's train images, as extract takes it
    ref = resolve_options("cells", "reinhard", "rgb", split)
    assert pre["stain_reference"] == [round(v, 4) for v in ref.stain_reference]
    assert run.config["finetune"]["input"] == "cells+lowres16+reinhard+grey"
    assert run.config["model"] == "basic-cnn<cells+lowres16+reinhard+grey>"  # named as heads are
    assert run.config["finetune"]["stain_jitter"] == 0.05
    assert "HED stain jitter 0.05" in run.config["augmentation"]
    # a config's [finetune] input is checked like the study's inputs
    from featsvm.config import ConfigError

    with pytest.raises(ConfigError, match="input"):
        ft.finetune_config({"finetune": {"input": "tiles"}})
    assert json.loads((run.path / "config.json").read_text())["n_inputs"]["train"] >= 12


def test_finetune_cv_refuses_the_cell_view(fields, tmp_path):
    from featsvm.cli import main

    data, split = fields
    result = CliRunner().invoke(main, [
        "finetune", str(data), "--split", str(split), "--model", "basic-cnn", "--cv", "2",
        "--view", "cells", "--runs", str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 1 and "whole field only" in result.output
    with pytest.raises(ft.FinetuneError, match="whole field only"):
        from featsvm.models.finetune_cv import finetune_cv

        finetune_cv(data, split, dataclasses.replace(TINY, input="cells"), 2,
                    runs_dir=tmp_path / "runs", progress=False)
