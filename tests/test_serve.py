"""`featsvm serve`: the API (limits, errors, no files written) and the page in a real browser.

The browser test drives Debian's Chromium (/usr/bin/chromium) with Playwright for Python; it
skips only when Playwright or Chromium is absent, and fails instead when
FEATSVM_REQUIRE_BROWSER=1 (set by .ci/run, where both must be present). With
FEATSVM_SERVE_SCREENSHOT=PATH it also saves a screenshot of the page (synthetic images only).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import test_predict
from conftest import random_cell_image

pytest.importorskip("fastapi", reason="featsvm[serve] is not installed")
import uvicorn  # noqa: E402

from featsvm.serve.app import create_app, load_runs  # noqa: E402

tiny, head_run, cnn_run = test_predict.tiny, test_predict.head_run, test_predict.cnn_run
CHROMIUM = os.environ.get("FEATSVM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(head_run: Path, cnn_run: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = load_runs([head_run, cnn_run], device="cpu")
    app = create_app(runs, max_bytes=300_000)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", runs
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("upload")
    rng = np.random.default_rng(7)
    out = {}
    for i, name in enumerate(["cell-a.jpg", "cell-b.png"]):
        random_cell_image(rng, 96, i).save(d / name)
        out[name] = d / name
    (d / "notes.txt").write_text("this is not an image")
    out["notes.txt"] = d / "notes.txt"
    big = d / "huge.bmp"  # a valid image over the 300 kB limit of the test server
    random_cell_image(rng, 400, 0).save(big)
    out["huge.bmp"] = big
    return out


def _post(url: str, data: bytes, name: str, run: int = 0) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/api/predict?run={run}", data=data, method="POST",
                                 headers={"X-Filename": name,
                                          "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_api_predicts_and_explains_each_run(server, images) -> None:
    url, runs = server
    data = images["cell-a.jpg"].read_bytes()
    for run in runs:
        status, r = _post(url, data, "cell-a.jpg", run.index)
        assert status == 200, r
        assert r["run_id"] == run.run_id
        assert sum(r["proba"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["prob_malignant"] == pytest.approx(1 - r["proba"]["benign"], abs=1e-6)
        assert r["heatmap"].startswith("data:image/png;base64,")
        assert r["method"] == ("cam" if run.predictor.kind == "head" else "gradcam")
        # the same numbers as `featsvm predict`
        from featsvm.predict import predict

        (p,) = predict(run.run_dir, [images["cell-a.jpg"]], progress=False).predictions
        assert r["pred_label"] == p.pred_label
        assert r["prob_malignant"] == pytest.approx(p.prob_malignant, abs=1e-5)


def test_api_refuses_bad_files_with_a_clear_message(server, images) -> None:
    url, _ = server
    status, r = _post(url, images["notes.txt"].read_bytes(), "notes.txt")
    assert status == 415 and "notes.txt" in r["error"] and "JPEG" in r["error"]
    status, r = _post(url, images["huge.bmp"].read_bytes(), "huge.bmp")
    assert status == 413 and "MB limit" in r["error"]
    status, r = _post(url, b"", "empty.png")
    assert status == 422 and "empty" in r["error"]
    status, r = _post(url, b"\xff\xd8\xff broken jpeg", "broken.jpg")
    assert status in (415, 422) and "broken.jpg" in r["error"]
    status, r = _post(url, images["cell-a.jpg"].read_bytes(), "x.jpg", run=9)
    assert status == 400 and "unknown run" in r["error"]


def test_uploads_are_never_written_to_disk(server, images, tmp_path: Path, monkeypatch) -> None:
    """No file is opened for writing while an upload is handled."""
    import builtins

    url, _ = server
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, mode="r", *a, **k):
        if any(c in str(mode) for c in "wax+"):
            opened.append(str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    status, _ = _post(url, images["cell-b.png"].read_bytes(), "cell-b.png")
    assert status == 200 and opened == []


def test_page_in_a_real_browser(server, images, tmp_path: Path) -> None:
    required = os.environ.get("FEATSVM_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("FEATSVM_REQUIRE_BROWSER=1 but playwright is not installed")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        if required:
            pytest.fail(f"FEATSVM_REQUIRE_BROWSER=1 but {CHROMIUM} is missing")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    url, runs = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900},
                                    accept_downloads=True)
            page.goto(url + "/")
            assert "featsvm" in page.title()
            options = page.locator("#run option")
            assert options.count() == len(runs)
            # two synthetic images with the head run, then one with the end-to-end run
            page.set_input_files("#files", [str(images["cell-a.jpg"]), str(images["cell-b.png"])])
            page.wait_for_function(
                "document.querySelectorAll('#results tbody tr.done').length === 2",
                timeout=180_000)
            page.select_option("#run", str(runs[1].index))
            page.set_input_files("#files", [str(images["cell-a.jpg"])])
            page.wait_for_function(
                "document.querySelectorAll('#results tbody tr.done').length === 3",
                timeout=180_000)
            done = page.locator("#results tbody tr.done")
            labels = done.locator("td.label").all_text_contents()
            assert len(labels) == 3 and all(labels)
            pmal = [float(v) for v in done.locator("td.pmal").all_text_contents()]
            assert all(0.0 <= v <= 1.0 for v in pmal)
            assert done.nth(2).locator("td.run").text_content() == runs[1].model
            widths = page.eval_on_selector_all(
                "#results img.heatmap", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) == 3 and all(w > 0 for w in widths), widths
            # a bad file: a clear message on the page, the others unaffected
            page.set_input_files("#files", [str(images["notes.txt"])])
            page.wait_for_selector("#results tbody tr.error", timeout=60_000)
            msg = page.locator("#messages .msg").first.text_content() or ""
            assert "notes.txt" in msg and "JPEG" in msg
            # the batch as CSV
            with page.expect_download() as dl:
                page.click("#csv")
            path = tmp_path / "batch.csv"
            dl.value.save_as(path)
            rows = list(csv.DictReader(io.StringIO(path.read_text())))
            assert [r["file"] for r in rows] == ["cell-a.jpg", "cell-b.png", "cell-a.jpg"]
            assert [r["run_id"] for r in rows] == [runs[0].run_id] * 2 + [runs[1].run_id]
            assert all(abs(float(r["prob_malignant"]) - v) < 1e-3
                       for r, v in zip(rows, pmal, strict=True))
            shot = tmp_path / "serve.png"
            page.screenshot(path=str(shot), full_page=True)
            keep = os.environ.get("FEATSVM_SERVE_SCREENSHOT")
            if keep:
                shutil.copy(shot, keep)
        finally:
            browser.close()
