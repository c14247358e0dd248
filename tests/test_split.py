"""Duplicate grouping and the split: planted copies, re-captures, overlays, stratification."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFilter

from featsvm.cli import main
from featsvm.data.duplicates import group_images
from featsvm.data.manifest import read_manifest
from featsvm.data.split import assign_groups, make_split, parse_ratios
from featsvm.labels import LABELS

FOLDERS = ("Benign", "Early", "Pre", "Pro")


def smear_frame(seed: int, w: int = 360, h: int = 270) -> Image.Image:
    """A synthetic 'field of view': textured background, many red cells, a few nuclei."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (h // 6, w // 6, 3))
    bg = Image.fromarray(np.clip(215 + 18 * noise, 0, 255).astype(np.uint8)).resize((w, h), 3)
    draw = ImageDraw.Draw(bg)
    for _ in range(70):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(6, 16), rng.uniform(6, 16)
        shade = tuple(int(v) for v in rng.integers(120, 200, 3))
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), outline=shade, width=int(rng.integers(2, 5)))
    for _ in range(6):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(12, 24)
        colour = (int(rng.integers(60, 140)), 40, int(rng.integers(120, 200)))
        draw.ellipse((x - r, y - r * 0.8, x + r, y + r * 0.8), fill=colour)
    return bg.filter(ImageFilter.GaussianBlur(0.6))


def add_overlay(im: Image.Image) -> Image.Image:
    """The same burnt-in scale annotation in the bottom-right corner, as microscopes add."""
    im = im.copy()
    d = ImageDraw.Draw(im)
    w, h = im.size
    d.rectangle((w - 44, h - 26, w - 2, h - 2), fill=(255, 255, 255))
    d.line((w - 42, h - 6, w - 6, h - 6), fill=(0, 0, 0), width=3)
    d.line((w - 42, h - 12, w - 42, h - 2), fill=(0, 0, 0), width=2)
    d.text((w - 40, h - 25), "200 px", fill=(0, 0, 0))
    return im


def view(frame: Image.Image, box: tuple[int, int, int, int], size: int = 224) -> Image.Image:
    return add_overlay(frame.crop(box).resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base view + exact copy + half-frame shift + re-encode + rescaled crop, and 3 unrelated
    images that share only the identical corner overlay."""
    d = tmp_path_factory.mktemp("planted")
    frame = smear_frame(1)
    files = {
        "base": view(frame, (0, 0, 240, 240)),
        "shifted": view(frame, (110, 20, 350, 260)),  # 110/240 = 46% of the frame width
        "rescaled": view(frame, (15, 15, 225, 225)),  # 12% smaller crop, scaled up
    }
    paths = {}
    for name, im in files.items():
        paths[name] = d / f"{name}.jpg"
        im.save(paths[name], quality=92)
    paths["exact"] = d / "exact.jpg"
    shutil.copy(paths["base"], paths["exact"])
    paths["reencoded"] = d / "reencoded.jpg"
    Image.open(paths["base"]).save(paths["reencoded"], quality=55)
    for k in range(3):
        paths[f"other{k}"] = d / f"other{k}.jpg"
        view(smear_frame(100 + k), (0, 0, 240, 240)).save(paths[f"other{k}"], quality=92)
    return paths


def _groups(paths: dict[str, Path]) -> dict[str, int]:
    from featsvm.fileio import sha256_file

    names = sorted(paths)
    g = group_images([str(paths[n]) for n in names], [sha256_file(paths[n]) for n in names])
    return dict(zip(names, g.group_of, strict=True))


def test_planted_copies_share_a_group_and_overlay_does_not_join(planted: dict[str, Path]) -> None:
    g = _groups(planted)
    same = {g[n] for n in ("base", "exact", "shifted", "reencoded", "rescaled")}
    assert len(same) == 1, g
    others = [g[f"other{k}"] for k in range(3)]
    assert len(set(others)) == 3 and same.isdisjoint(others), g


def test_bow_index_path_finds_the_same_groups(planted: dict[str, Path]) -> None:
    from featsvm.data.duplicates import DuplicateConfig
    from featsvm.fileio import sha256_file

    names = sorted(planted)
    cfg = DuplicateConfig(exhaustive_below=0, candidates=3, vocabulary=64)
    g = group_images([str(planted[n]) for n in names], [sha256_file(planted[n]) for n in names],
                     cfg).group_of
    by = dict(zip(names, g, strict=True))
    assert len({by[n] for n in ("base", "exact", "shifted", "reencoded", "rescaled")}) == 1
    assert len({by[f"other{k}"] for k in range(3)} | {by["base"]}) == 4


def test_overlay_only_pair_is_not_a_duplicate(tmp_path: Path) -> None:
    """Two flat, different images whose only shared content is the overlay."""
    paths = []
    for k, colour in enumerate([(230, 220, 240), (225, 235, 215)]):
        im = Image.new("RGB", (224, 224), colour)
        ImageDraw.Draw(im).ellipse((40 + 30 * k, 50, 120 + 30 * k, 130), fill=(120, 60, 160))
        paths.append(tmp_path / f"o{k}.jpg")
        add_overlay(im).save(paths[-1], quality=95)
    g = group_images([str(p) for p in paths], ["a", "b"])
    assert g.group_of[0] != g.group_of[1] and not g.pairs


def _dataset(root: Path, per_class: int = 10, dup_of: dict[str, str] | None = None) -> Path:
    """Distinct frames per class in the Original layout; `dup_of` plants extra views."""
    k = 0
    for c, folder in enumerate(FOLDERS):
        (root / "Original" / folder).mkdir(parents=True)
        for j in range(per_class):
            frame = smear_frame(1000 * c + j)
            view(frame, (0, 0, 240, 240)).save(root / "Original" / folder / f"{j:03d}.jpg")
            k += 1
    return root


def test_split_groups_never_straddle_and_are_stratified(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    frame = smear_frame(0)  # == Benign/000's frame: plant two more views of it
    view(frame, (100, 10, 340, 250)).save(root / "Original/Benign/shift.jpg")
    shutil.copy(root / "Original/Benign/000.jpg", root / "Original/Benign/copy.jpg")
    res = make_split(root, tmp_path / "split.csv", seed=3)
    rows = {r.relpath: r for r in res.rows}
    planted = ["Original/Benign/000.jpg", "Original/Benign/shift.jpg", "Original/Benign/copy.jpg"]
    assert len({rows[p].group for p in planted}) == 1
    assert len({rows[p].split for p in planted}) == 1
    split_of_group: dict[int, set[str]] = {}
    for r in res.rows:
        split_of_group.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of_group.values())
    assert res.grouping.exact_duplicate_files == 1
    counts = Counter(r.split for r in res.rows)
    assert counts["val"] >= 3 and counts["test"] >= 3


def test_assign_groups_stratifies_within_two_points() -> None:
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for g in range(3000):  # mostly singletons, some larger groups, like the real data
        size = int(rng.choice([1, 1, 1, 2, 3, 5]))
        lab = LABELS[int(rng.choice(4, p=[0.15, 0.3, 0.3, 0.25]))]
        labels += [lab] * size
        groups += [g] * size
    splits, conflicts = assign_groups(labels, groups, (0.8, 0.1, 0.1), seed=1)
    assert not conflicts
    n = len(labels)
    whole = Counter(labels)
    for s, ratio in zip(("train", "val", "test"), (0.8, 0.1, 0.1), strict=True):
        idx = [i for i in range(n) if splits[i] == s]
        assert abs(len(idx) / n - ratio) < 0.01
        part = Counter(labels[i] for i in idx)
        for lab in LABELS:
            assert abs(part[lab] / len(idx) - whole[lab] / n) < 0.02


def test_label_conflict_group_stays_out_of_test() -> None:
    labels = ["benign", "pre_b"] * 20 + ["benign"] * 40 + ["pre_b"] * 40
    groups = [0] * 40 + list(range(1, 81))  # group 0 mixes labels
    for seed in range(5):
        splits, conflicts = assign_groups(labels, groups, (0.34, 0.33, 0.33), seed=seed)
        assert conflicts == {0}
        assert all(splits[i] != "test" for i in range(40))


def test_cli_is_deterministic_with_folds(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", per_class=8)
    runner = CliRunner()
    outs = []
    for name in ("a.csv", "b.csv"):
        res = runner.invoke(main, ["split", str(root), "--out", str(tmp_path / name),
                                   "--seed", "7", "--folds", "3"])
        assert res.exit_code == 0, res.output
        outs.append((tmp_path / name).read_bytes())
    assert outs[0] == outs[1]
    assert "exact-duplicate files" in res.output and "label conflicts" in res.output
    m = read_manifest(tmp_path / "a.csv")
    assert {r.fold for r in m.rows if r.split == "train"} == {0, 1, 2}
    assert all(r.fold is None for r in m.rows if r.split != "train")
    other = runner.invoke(main, ["split", str(root), "--out", str(tmp_path / "c.csv"),
                                 "--seed", "8"])
    assert other.exit_code == 0
    assert (tmp_path / "c.csv").read_bytes() != outs[0]


def test_bad_ratios_and_missing_data_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        parse_ratios("0.5,0.5")
    res = CliRunner().invoke(main, ["split", str(tmp_path / "nope")])
    assert res.exit_code != 0 and "Kaggle" in res.output


@pytest.mark.shared_data
def test_real_dataset_split(shared_data: Path, tmp_path: Path) -> None:
    res = make_split(shared_data, tmp_path / "split.csv", seed=0)
    assert len(res.rows) == 3256
    assert res.scan.counts() == {"benign": 504, "early_pre_b": 985, "pre_b": 963, "pro_b": 804}
    split_of_group: dict[int, set[str]] = {}
    for r in res.rows:
        split_of_group.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of_group.values())
    assert res.grouping.exact_duplicate_files > 0
