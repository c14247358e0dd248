"""End-to-end training (featsvm.models.finetune) on tiny generated images."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_dataset

from featsvm import names, runs
from featsvm.config import ConfigError, load_toml
from featsvm.data.dataset import load_rgb, scan
from featsvm.data.manifest import ManifestRow, read_manifest, write_manifest
from featsvm.evaluation import metrics as fm
from featsvm.evaluation.calibration import apply_temperature
from featsvm.models import finetune as ft
from featsvm.models import networks as nw
from featsvm.models import pixels as px
from featsvm.models.basic_cnn import BasicCNNSpec, basic_cnn_preprocessing

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings: 32 px basic CNN, few epochs, few bootstrap resamples.
TINY = ft.FinetuneConfig(
    epochs=3, batch_size=8, basic_cnn_size=32, basic_cnn_channels=(8, 16),
    basic_cnn_dense=16, lr=3e-3, warmup_epochs=0.5, n_boot=20, channels_last=False,
    workers=1, device="cpu",
)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """4 classes x 10 images: 6 train, 2 val, 2 test per class; one group per image."""
    root = tmp_path_factory.mktemp("ft")
    data = make_dataset(root / "data", per_class=10, size=48, seed=3)
    rows = []
    for i, rec in enumerate(scan(data).records):
        j = i % 10
        split = "train" if j < 6 else ("val" if j < 8 else "test")
        rows.append(ManifestRow(rec.relpath, rec.sha256, rec.label, i, split))
    write_manifest(root / "split.csv", rows)
    return data, root / "split.csv"


def _run(tiny_split, tmp_path: Path, cfg: ft.FinetuneConfig = TINY, **kw) -> ft.FinetuneResult:
    data, split = tiny_split
    kw.setdefault("runs_dir", tmp_path / "runs")
    kw.setdefault("resume", False)
    return ft.finetune(data, split, cfg, progress=False, **kw)


def _history(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / runs.HISTORY_FILE, newline="") as f:
        return list(csv.DictReader(f))


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / ft.MODEL_FILE, weights_only=True)["state_dict"]


def test_training_lowers_the_loss(tiny_split, tmp_path):
    cfg = dataclasses.replace(TINY, epochs=8, augment=False, patience=0, lr=1e-2,
                              basic_cnn_dropout=0.0)
    res = _run(tiny_split, tmp_path, cfg)
    losses = [float(r["train_loss"]) for r in _history(res.run_dir)]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0], losses
    assert res.record is not None and res.record.metrics["val"]["accuracy"] > 0.25


def test_run_record_is_complete_and_predict_agrees(tiny_split, tmp_path):
    data, split = tiny_split
    res = _run(tiny_split, tmp_path)
    rec = runs.read_run(res.run_dir)
    cfg = rec.config
    assert set(runs.REQUIRED_CONFIG_KEYS) <= set(cfg)
    assert cfg["kind"] == "end_to_end" and cfg["backbone"] is None and cfg["head"] is None
    assert cfg["weights"]["label"] == "none"
    assert cfg["preprocessing"]["input_size"] == 32
    assert cfg["split"]["sha256"] == read_manifest(split).sha256
    assert runs.verify_sidecar(rec.model_path)
    # predictions cover exactly the val and test images of the manifest
    manifest = read_manifest(split)
    preds = rec.predictions()
    expected = {r.relpath for r in manifest.rows if r.split in ("val", "test")}
    assert set(preds.relpath) == expected and len(preds.relpath) == len(expected)
    # metrics.json has the keys `fit` writes (same scoring function, same shape)
    reference = fm.score_predictions(manifest, preds.relpath, preds.proba, n_boot=5)
    assert set(rec.metrics) == {"val", "test", "calibration", "selective"}
    # temperature fitted on val; calibration before/after and the val-chosen threshold
    temperature = cfg["calibration"]["temperature"]
    assert temperature > 0 and cfg["calibration"]["fitted_on"] == "val"
    assert rec.metrics["calibration"]["temperature"] == temperature
    assert set(rec.metrics["calibration"]["before"]) == {"val", "test"}
    assert cfg["abstention"]["threshold"] == rec.metrics["selective"]["threshold"]
    for split_name in ("val", "test"):
        assert set(rec.metrics[split_name]) == set(reference[split_name])
        assert rec.metrics[split_name]["accuracy"] == reference[split_name]["accuracy"]
        assert rec.metrics[split_name]["ci95"]
    # per-epoch history; checkpoints removed once finished
    assert len(_history(res.run_dir)) == cfg["epochs_run"] == 3
    assert not (res.run_dir / ft.LAST_CHECKPOINT).exists()
    # the saved model, reloaded with its own transform, reproduces predictions.csv
    model, transform, _ = nw.load_finetuned(res.run_dir)
    test = preds.select("test")
    x = torch.stack([transform(load_rgb(data / p)) for p in test.relpath])
    with torch.no_grad():
        proba = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(apply_temperature(proba, temperature), test.proba, atol=2e-5)


def test_same_seed_same_metrics_and_resume_continues_exactly(tiny_split, tmp_path):
    full = _run(tiny_split, tmp_path / "a")
    again = _run(tiny_split, tmp_path / "b")
    assert full.record.metrics == again.record.metrics
    # interrupted after one epoch, then resumed automatically (same fingerprint)
    part = _run(tiny_split, tmp_path / "c", max_epochs_this_call=1)
    assert not part.finished and (part.run_dir / ft.LAST_CHECKPOINT).is_file()
    assert not runs.is_complete(part.run_dir)
    resumed = _run(tiny_split, tmp_path / "c", resume=True)
    assert resumed.run_dir == part.run_dir and resumed.resumed_from_epoch == 1
    assert resumed.record.config["resumed"] is True
    assert resumed.record.metrics == full.record.metrics
    # the OOD flag is fitted once at the end, on the best weights: the same as uninterrupted
    assert resumed.record.config["ood"]["threshold"] == full.record.config["ood"]["threshold"]
    a, b = _state(full.run_dir), _state(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _history(full.run_dir)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"}
                     for r in _history(resumed.run_dir)]
    # a different seed is a different run
    other = _run(tiny_split, tmp_path / "d", dataclasses.replace(TINY, seed=1))
    c = _state(other.run_dir)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_run_folder_being_trained_is_refused_to_a_second_process(tiny_split, tmp_path):
    from featsvm.fileio import FileLock

    part = _run(tiny_split, tmp_path, max_epochs_this_call=1)
    # another process training this folder holds its lock (flock conflicts across open files)
    held = FileLock(part.run_dir / ft.TRAIN_LOCK, True, lambda p, e: RuntimeError(str(p)))
    with held, pytest.raises(nw.FinetuneError, match="being trained by another"):
        _run(tiny_split, tmp_path, resume=True)
    done = _run(tiny_split, tmp_path, resume=True)  # lock released: resumes and finishes
    assert done.run_dir == part.run_dir and done.finished
    assert not (done.run_dir / ft.TRAIN_LOCK).exists()


def test_resume_refuses_a_run_with_other_settings(tiny_split, tmp_path):
    part = _run(tiny_split, tmp_path, max_epochs_this_call=1)
    with pytest.raises(nw.FinetuneError, match="fingerprint"):
        _run(tiny_split, tmp_path, dataclasses.replace(TINY, lr=1e-2), resume=part.run_dir)
    # and automatic resume ignores it, starting a fresh folder
    fresh = _run(tiny_split, tmp_path, dataclasses.replace(TINY, epochs=1), resume=True)
    assert fresh.run_dir != part.run_dir and fresh.resumed_from_epoch == 0


def test_augmentation_only_touches_training_images(tiny_split, tmp_path, monkeypatch):
    seen: list[int] = []
    real = px.augment

    def spy(x, gen, jitter):
        seen.append(x.shape[0])
        return real(x, gen, jitter)

    monkeypatch.setattr(ft, "augment", spy)
    res = _run(tiny_split, tmp_path, dataclasses.replace(TINY, epochs=2))
    n_train = res.record.config["n_images"]["train"]
    assert sum(seen) == 2 * n_train  # every train image once per epoch, nothing else


def test_augment_is_label_preserving_geometry_and_mild_colour():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    y = px.augment(x, gen, jitter=0.0)
    assert y.shape == x.shape
    # without jitter each image is a dihedral transform: same multiset of pixel values
    assert torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    assert not torch.equal(x, y)
    z = px.augment(x, gen, jitter=0.1)
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    assert float((z.mean() - x.mean()).abs()) < 0.1


def test_normaliser_recovers_the_transform_exactly():
    pre = basic_cnn_preprocessing(BasicCNNSpec(input_size=32, channels=(8,)))
    norm = px.Normaliser.probe(pre.transform())
    np.testing.assert_allclose(norm.mean, pre.mean, atol=1e-5)
    np.testing.assert_allclose(norm.std, pre.std, atol=1e-5)


def test_freeze_rules_resolve_for_every_backbone():
    for name in names.BACKBONES:
        built = nw.build_model(name, ft.FinetuneConfig(model=name), weights="none")
        until = nw.apply_freeze(built, "auto")
        assert until == nw.FREEZE_AUTO[name]
        trainable = [n for n, p in built.model.named_parameters() if p.requires_grad]
        frozen = [n for n, p in built.model.named_parameters() if not p.requires_grad]
        assert frozen and "head.1.weight" in trainable
        assert all(n.startswith("head.") for n in trainable[-2:])
    built = nw.build_model("efficientnet_lite0", ft.FinetuneConfig(), weights="none")
    with pytest.raises(nw.FinetuneError, match="blocks"):
        nw.apply_freeze(built, "no_such_block")
    nw.apply_freeze(built, "all")
    assert [n for n, p in built.model.named_parameters() if p.requires_grad] == [
        "head.1.weight", "head.1.bias"]


def test_finetuning_a_backbone_end_to_end_with_the_frozen_trunk_cache(tiny_split, tmp_path):
    """EfficientNet-Lite0 (random init; blocks.6, conv_head, bn2 and the head trainable), one
    short epoch on cached trunk outputs; the saved full model must reproduce the predictions
    from raw images, so training on the cache really trained the model that is saved."""
    data, _ = tiny_split
    cfg = dataclasses.replace(TINY, model="efficientnet_lite0", freeze="auto", epochs=1,
                              batch_size=12, cache_frozen=True, cache_views=2)
    res = _run(tiny_split, tmp_path, cfg, weights="none")
    c = res.record.config
    assert c["backbone"] == "efficientnet_lite0" and c["weights"]["label"] == "random"
    assert c["freeze_until"] == "blocks.5" and "cached view" in c["augmentation"]
    assert 0 < c["parameters"]["trainable"] < c["parameters"]["total"]
    assert c["preprocessing"]["input_size"] == 224 and c["timing"]["cache_seconds"] > 0
    hist = _history(res.run_dir)
    assert float(hist[0]["lr_backbone"]) == pytest.approx(
        float(hist[0]["lr_head"]) * cfg.backbone_lr_mult)
    model, transform, _ = nw.load_finetuned(res.run_dir)
    test = res.record.predictions().select("test")
    x = torch.stack([transform(load_rgb(data / p)) for p in test.relpath])
    with torch.no_grad():
        proba = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(apply_temperature(proba, c["calibration"]["temperature"]),
                               test.proba, atol=1e-4)
    # the OOD flag: train embeddings from the cache (identity view), val / test from the
    # prediction pass; predict, running the whole network on the raw images, flags the test
    # images as the run recorded (same penultimate-layer embedding)
    from featsvm.predict import predict

    ood = c["ood"]
    assert "1280-d" in ood["embedding"] and (res.run_dir / ood["file"]).is_file()
    got = predict(res.run_dir, [data / p for p in test.relpath], progress=False)
    assert np.mean([p.ood for p in got.predictions]) == pytest.approx(ood["rate_test"])


def test_trunk_split_composes_to_the_model():
    built = nw.build_model("efficientnet_lite0", ft.FinetuneConfig(), weights="none")
    nw.apply_freeze(built, "auto")
    trunk, rest = nw.split_trunk(built.model)
    assert not any(p.requires_grad for p in trunk.parameters())
    assert any(p.requires_grad for p in rest[0].parameters())
    built.model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(rest(trunk(x)), built.model(x), rtol=1e-4, atol=1e-4)
    unfrozen = nw.build_model("efficientnet_lite0", ft.FinetuneConfig(), weights="none")
    with pytest.raises(nw.FinetuneError, match="freeze"):
        nw.split_trunk(unfrozen.model)


def test_bad_and_changed_images_are_skipped_and_listed(tiny_split, tmp_path):
    data, split = tiny_split
    copy = tmp_path / "data"
    import shutil

    shutil.copytree(data, copy)
    manifest = read_manifest(split)
    victim = manifest.subset("train")[0].relpath
    (copy / victim).write_bytes(b"not a jpeg")
    res = ft.finetune(copy, split, dataclasses.replace(TINY, epochs=1), runs_dir=tmp_path / "r",
                      resume=False, progress=False)
    assert [s["relpath"] for s in res.record.config["skipped"]] == [victim]
    assert "sha256" in res.record.config["skipped"][0]["reason"]


def test_cli_and_config_files(tiny_split, tmp_path):
    from featsvm.cli import main

    for name in ("cpu.toml", "gpu.toml"):
        cfg = ft.finetune_config(load_toml(REPO / "configs" / name), name)
        for model in cfg.models:
            cfg.for_model(model)  # overrides are valid keys
    cpu = ft.finetune_config(load_toml(REPO / "configs" / "cpu.toml"))
    assert cpu.for_model("efficientnet_lite0").freeze == "auto"
    with pytest.raises(ConfigError, match="unknown key"):
        ft.finetune_config({"finetune": {"epoch": 3}})
    with pytest.raises(ConfigError):
        ft.FinetuneConfig(overrides={"basic-cnn": {"lrr": 1}}).for_model("basic-cnn")

    data, split = tiny_split
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        "[finetune]\nbatch_size = 8\nbasic_cnn_size = 32\nbasic_cnn_channels = [8]\n"
        "basic_cnn_dense = 8\nn_boot = 5\nchannels_last = false\n", encoding="utf-8")
    result = CliRunner().invoke(main, [
        "finetune", str(data), "--split", str(split), "--model", "basic-cnn", "--epochs", "1",
        "--runs", str(tmp_path / "runs"), "--config", str(toml), "--quiet", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    assert "test (n=8): accuracy" in result.output
    assert "OOD flag: threshold" in result.output
    (run,), _ = runs.list_runs(tmp_path / "runs")
    assert run.config["finetune"]["epochs"] == 1 and run.config["finetune"]["batch_size"] == 8
    bad = CliRunner().invoke(main, [
        "finetune", str(data), "--split", str(split), "--model", "basic-cnn",
        "--weights", "x.pth", "--runs", str(tmp_path / "runs"), "--quiet",
    ])
    assert bad.exit_code != 0 and "from scratch" in bad.output


def test_time_budget_stops_training_between_epochs(tiny_split, tmp_path):
    res = _run(tiny_split, tmp_path, dataclasses.replace(TINY, max_train_minutes=1e-6))
    assert res.finished and res.epochs_done == 1
    assert res.record.config["stopped_by_budget"] is True


def test_cached_views_carry_the_stain_jitter_and_view_0_stays_plain() -> None:
    """With the frozen-trunk cache, views 1.. of the train images are stain-jittered when
    stain_jitter > 0 (and augment is on); view 0, val and test, and the flips/rotations drawn
    for the views are those of a run without jitter."""
    gen = torch.Generator().manual_seed(0)
    pix = (torch.rand(6, 3, 8, 8, generator=gen) * 200 + 40).to(torch.uint8)  # stained, no black
    rows = [ManifestRow(f"a/{i}.png", f"{i:064x}", "benign", i, "train") for i in range(6)]
    sets = {name: px.ImageSet(rows, pix.clone(), torch.zeros(6, dtype=torch.int64))
            for name in ("train", "val", "test")}
    norm = px.Normaliser((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    plain_cfg = dataclasses.replace(TINY, cache_frozen=True, cache_views=3, augment=True)

    def cached(cfg: ft.FinetuneConfig) -> dict[str, torch.Tensor]:
        return ft.cache_trunk(torch.nn.Identity(), sets, norm, cfg, torch.device("cpu"),
                              progress=False)

    plain = cached(plain_cfg)
    jit = cached(dataclasses.replace(plain_cfg, stain_jitter=0.2))
    off = cached(dataclasses.replace(plain_cfg, stain_jitter=0.2, augment=False))
    assert torch.equal(plain["train"][0], jit["train"][0])
    assert torch.equal(plain["val"], jit["val"]) and torch.equal(plain["test"], jit["test"])
    for v in (1, 2):
        assert not torch.allclose(plain["train"][v], jit["train"][v], atol=1e-3)
        # same flip/rotation: the jitter changes colours, not where the pixels are
        mean_plain = plain["train"][v].mean(dim=1)
        mean_jit = jit["train"][v].mean(dim=1)
        assert torch.corrcoef(torch.stack([mean_plain.flatten(), mean_jit.flatten()]))[0, 1] > 0.9
    assert torch.equal(off["train"], plain["train"])
