"""Heatmaps: exact CAM, Grad-CAM, occlusion, the image geometry, where-it-looks and the
randomisation check, on tiny runs made in seconds (see test_predict.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_predict
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from featsvm.cli import main
from featsvm.errors import UsageError
from featsvm.evaluation import explanations as ex
from featsvm.explain import METHODS, Explainer, where_it_looks
from featsvm.features.preprocessing import Preprocessing

# the tiny dataset, head run and basic-cnn run of test_predict (made in seconds)
tiny, head_run, cnn_run = test_predict.tiny, test_predict.head_run, test_predict.cnn_run


def _gap_features(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = torch.as_tensor(rng.gamma(1.0, 1.0, (80, 16, 5, 6)), dtype=torch.float32)
    y = np.array(["benign", "early_pre_b", "pre_b", "pro_b"] * 20)
    A[:, :4] += torch.as_tensor(np.eye(4)[np.arange(80) % 4] * 2.0, dtype=torch.float32)[
        :, :, None, None]
    return A, A.double().mean(dim=(2, 3)).numpy(), y


def test_cam_of_scaler_pca_logreg_adds_up_to_the_logits() -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    A, g, y = _gap_features()
    for pca in ("passthrough", PCA(6, random_state=0), PCA(5, whiten=True, random_state=0)):
        pipe = Pipeline([("scale", StandardScaler()), ("pca", pca),
                         ("clf", LogisticRegression(C=1.0, max_iter=2000))]).fit(g, y)
        aff = ex.affine_head(pipe, g.shape[1])
        maps = ex.linear_cam(A, aff).numpy()  # [N, K, h, w]
        np.testing.assert_allclose(maps.mean(axis=(2, 3)) + aff.b, pipe.decision_function(g),
                                   atol=1e-8)


def test_cam_refuses_a_head_that_is_not_linear() -> None:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from featsvm.models.heads import KernelSVC

    _, g, y = _gap_features()
    pipe = Pipeline([("scale", StandardScaler()), ("clf", KernelSVC("rbf"))]).fit(g, y)
    with pytest.raises(UsageError, match="occlusion"):
        ex.affine_head(pipe, g.shape[1])


def test_gradcam_of_a_pooled_linear_net_is_its_cam() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net = nn.Sequential(trunk, tail)
    cut = ex.split_at_global_pool(nn.Sequential(trunk, *tail[:2]))  # an embedder
    assert cut is not None and len(cut[0]) == 2
    x = torch.randn(2, 3, 10, 12)
    cam, logits = ex.gradcam(cut[0], nn.Sequential(*cut[1], tail[2]), x, torch.tensor([1, 3]))
    A = trunk(x).detach()
    W = tail[2].weight.detach()
    want = torch.einsum("nc,nchw->nhw", W[[1, 3]], A) / (10 * 12)
    torch.testing.assert_close(cam, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, net(x).detach())


def test_no_global_pool_no_cut() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 4))  # like a VGG fc7 embedder: a layer after the pool
    assert ex.split_at_global_pool(net) is None


def test_occlusion_finds_the_region_the_score_reads() -> None:
    def score(x: torch.Tensor) -> np.ndarray:  # P(class 0) grows with the top-left brightness
        s = torch.sigmoid(x[:, :, 4:12, 4:12].mean(dim=(1, 2, 3)) * 3).numpy()
        return np.stack([s, 1 - s], axis=1)

    x = torch.ones(1, 3, 32, 32)
    heat = ex.occlusion(score, x, np.array([0]), patch=8, stride=4,
                        fill=torch.zeros(1, 3), batch_size=5)[0]
    assert heat.shape == (32, 32)
    assert heat[8, 8] > 0.05 and abs(heat[28, 28]) < 1e-9
    assert np.unravel_index(heat.argmax(), heat.shape)[0] < 16


def test_to_image_undoes_resize_and_centre_crop() -> None:
    pre = Preprocessing(input_size=224, resize=256, interpolation="bilinear", crop=224,
                        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    heat, vis = ex.to_image(np.ones((7, 7)), pre, (224, 224))
    assert heat.shape == vis.shape == (224, 224)
    # 224 -> 256, centre 224 kept: 16 px of 256 cut each side = 14 px of the original
    rows = np.where(vis.any(axis=1))[0]
    assert abs(rows[0] - 14) <= 1 and abs(rows[-1] - 209) <= 1
    heat, vis = ex.to_image(np.ones((7, 7)), pre, (300, 200))  # landscape: width is cropped
    assert vis.shape == (200, 300) and vis[:, 0].sum() == 0 and vis[100, 150]


def test_regions_find_magenta_cells_and_the_corner() -> None:
    img = np.full((100, 100, 3), 235, np.uint8)
    img[20:40, 20:40] = (150, 60, 160)  # a magenta "white cell"
    img[60:70, 10:20] = (170, 175, 200)  # a grey-blue "red cell"
    m = ex.regions(Image.fromarray(img))
    assert m["cells"][25:35, 25:35].all() and not m["cells"][62:68, 12:18].any()
    assert m["corner"][90, 90] and not m["corner"][10, 10]
    assert not (m["cells"] & m["corner"]).any()
    heat = np.zeros((100, 100))
    heat[20:40, 20:40] = 1.0
    s = ex.heat_shares(heat, m)
    assert s["cells"] == pytest.approx(1.0, abs=0.03) and s["corner"] == 0.0  # corners rounded
    assert s["area_cells"] == pytest.approx(0.04, abs=0.01)


@pytest.mark.parametrize(("run", "method", "used"), [
    ("head_run", "auto", "cam"), ("head_run", "occlusion", "occlusion"),
    ("cnn_run", "auto", "gradcam"), ("cnn_run", "occlusion", "occlusion"),
])
def test_explain_command_writes_overlays(run: str, method: str, used: str,
                                         tiny: dict[str, Path], request, tmp_path: Path
                                         ) -> None:
    run_dir = request.getfixturevalue(run)
    files = sorted((tiny["data"] / "Original" / "Pre").iterdir())[:2]
    out = tmp_path / "maps"
    res = CliRunner().invoke(main, ["explain", "--run", str(run_dir), *map(str, files),
                                    "--out", str(out), "--method", method, "--quiet",
                                    "--patch", "64"])  # few occlusions: a quick test
    assert res.exit_code == 0, res.output
    pngs = sorted(out.glob(f"*.{used}.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).size == Image.open(files[0]).size
    assert (out / "heatmaps.csv").read_text().count("\n") == 3


def test_methods_that_do_not_apply_are_refused(head_run: Path, cnn_run: Path) -> None:
    with pytest.raises(UsageError, match="no gradients"):
        Explainer.from_run(head_run, "gradcam")
    with pytest.raises(UsageError, match="no exact CAM"):
        Explainer.from_run(cnn_run, "cam")
    from featsvm.cli.explain import METHODS as CLI_METHODS

    assert CLI_METHODS == METHODS


@pytest.mark.parametrize("run", ["head_run", "cnn_run"])
def test_where_it_looks_and_randomisation(run: str, tiny: dict[str, Path], request,
                                          tmp_path: Path) -> None:
    run_dir = request.getfixturevalue(run)
    s = where_it_looks(run_dir, tiny["data"], split="test", out_dir=tmp_path, n_random=8,
                       progress=False)
    assert s["n_images"] == s["n_split"] > 0
    assert sum(s["share"].values()) == pytest.approx(1.0, abs=1e-6)
    assert sum(s["area"].values()) == pytest.approx(1.0, abs=1e-6)
    on_disk = json.loads((tmp_path / "where.json").read_text())
    assert on_disk["method"] == s["method"]
    assert (tmp_path / "examples.png").is_file()
    # Adebayo et al. 2018: maps of the re-initialised model must not resemble the trained one.
    # Every layer re-initialised: checked for both runs. Only the last layer: checked for the
    # head run (a random linear head on the same features); the basic CNN here is trained one
    # epoch on 24 images, so its lower layers (kept) shape the map and the sign flips with the
    # last layer (|rho| ~0.8 measured): reported in where.json, not asserted.
    rnd = s["randomisation"]
    assert rnd["all"]["n_images"] > 0 and abs(rnd["all"]["spearman_mean"]) < 0.5, rnd
    if run == "head_run":
        assert abs(rnd["top"]["spearman_mean"]) < 0.5, rnd


def test_report_shows_where_it_looks(head_run: Path, tiny: dict[str, Path], tmp_path: Path
                                     ) -> None:
    import shutil

    from featsvm.evaluation.report import write_report

    runs = tmp_path / "runs"
    shutil.copytree(head_run, runs / head_run.name)
    s = where_it_looks(runs / head_run.name, tiny["data"], n_random=2, limit=4, progress=False)
    assert Path(s["out_dir"]) == runs / head_run.name / "explain"
    write_report(runs, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Where the models look" in page
    assert f"{100 * s['share']['cells']:.1f} %" in page
