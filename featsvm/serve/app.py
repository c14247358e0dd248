"""The `featsvm serve` web application (FastAPI + a Jinja2 template, served by uvicorn;
the ``serve`` extra: this module needs it at import).

One page (``GET /``): choose a run, drop or choose images, and each image is sent on its own
(``POST /api/predict?run=N``, the raw file as the request body) so that the page can show
results and errors per file as they come. The reply holds the class, P(malignant), all class
probabilities, the abstain / out-of-distribution flags when the run has them, and the heatmap
(`featsvm.explain`, method ``auto``) as a PNG data URL. The page builds the batch table and
its CSV itself.

Privacy: an upload is read into memory (never spooled to a temporary file, which is why the
body is the raw file rather than a multipart form), decoded, predicted and dropped; nothing is
written to disk and nothing is logged but the request line. The page loads no external asset
(no CDN): it works offline. Limits: `max_bytes` per image (413), a decodable JPEG, PNG, TIFF or
BMP under the decompression-bomb pixel limit (415 / 422), with a message naming the file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from featsvm.data.dataset import MAX_PIXELS, decode_rgb
from featsvm.errors import ImageError, UsageError
from featsvm.labels import DISPLAY_NAMES, LABELS

HERE = Path(__file__).resolve().parent
DEFAULT_MAX_MB = 20.0
FORMATS = ("JPEG", "PNG", "TIFF", "BMP")
HEATMAP_SIDE = 448  # the overlay is sent at most this wide / high


@dataclass
class LoadedRun:
    index: int
    run_dir: Path
    predictor: Any  # featsvm.predict.Predictor
    explainer: Any | None  # featsvm.explain.Explainer (None: no heatmaps)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def run_id(self) -> str:
        return str(self.predictor.record.run_id)

    @property
    def model(self) -> str:
        return str(self.predictor.record.config.get("model"))

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "run_id": self.run_id, "model": self.model,
                "kind": self.predictor.kind,
                "method": self.explainer.method if self.explainer is not None else None}


def load_runs(run_dirs: list[str | Path], weights: str | None = None,
              weights_dir: str | Path | None = None, device: str = "auto",
              heatmaps: bool = True) -> list[LoadedRun]:
    """Load every run now, so that a bad run folder is reported at start-up."""
    from featsvm.explain import Explainer
    from featsvm.predict import Predictor

    if not run_dirs:
        raise UsageError("name at least one run: featsvm serve --run runs/<run-id>")
    out = []
    for i, d in enumerate(run_dirs):
        predictor = Predictor.from_run(d, weights, weights_dir, device)
        # an ensemble has no single network to explain: its page shows no heatmap
        explainer = (Explainer(predictor, "auto") if heatmaps and predictor.kind != "ensemble"
                     else None)
        out.append(LoadedRun(i, Path(d), predictor, explainer))
    return out


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _png_data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def predict_upload(run: LoadedRun, data: bytes, name: str, heatmap: bool = True
                   ) -> dict[str, Any]:
    """Everything the page shows for one uploaded image (raises ImageError)."""
    from featsvm.evaluation.explanations import heat_shares, overlay, regions
    from featsvm.predict import predict_images

    image = decode_rgb(data, name)
    fmt = image.info.get("format")
    if fmt not in FORMATS:
        raise ImageError(f"{fmt} images are not accepted; use {', '.join(FORMATS)}")
    digest = hashlib.sha256(data).hexdigest()
    with run.lock:
        (pred,) = predict_images(run.predictor, [(name, digest, image)])
        exp = run.explainer.explain([image], [name])[0] if (
            heatmap and run.explainer is not None) else None
    out: dict[str, Any] = {
        "file": name, "sha256": digest, "run_id": run.run_id, "model": run.model,
        "width": image.size[0], "height": image.size[1],
        "pred_label": pred.pred_label, "pred_display": DISPLAY_NAMES.get(pred.pred_label,
                                                                         pred.pred_label),
        "prob_malignant": pred.prob_malignant,
        "proba": {lab: float(p) for lab, p in zip(LABELS, pred.proba, strict=True)},
        # flags other parts of featsvm may add to a Prediction (None: the run has none)
        "abstain": _flag(getattr(pred, "abstain", None)),
        "ood": _flag(getattr(pred, "ood", None)),
    }
    if exp is not None:
        shown = overlay(image, exp.heat, exp.visible)
        shown.thumbnail((HEATMAP_SIDE, HEATMAP_SIDE))
        shares = heat_shares(exp.heat, regions(image), exp.visible)
        out.update(heatmap=_png_data_url(shown), method=exp.method, explained=exp.target,
                   heat_cells=shares["cells"], heat_background=shares["background"],
                   heat_corner=shares["corner"])
    return out


def create_app(runs: list[LoadedRun], max_bytes: int = int(DEFAULT_MAX_MB * 1e6)) -> FastAPI:
    """The FastAPI application over already loaded runs."""
    app = FastAPI(title="featsvm", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    limits = {"max_bytes": max_bytes, "max_mb": max_bytes / 1e6, "formats": list(FORMATS),
              "max_megapixels": MAX_PIXELS / 1e6}

    def error(status: int, name: str, message: str) -> JSONResponse:
        return JSONResponse({"file": name, "error": message}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Any:
        return templates.TemplateResponse(request, "index.html", {
            "runs": [r.describe() for r in runs], "limits": limits,
            "labels": [(lab, DISPLAY_NAMES.get(lab, lab)) for lab in LABELS]})

    @app.get("/api/runs")
    def list_runs() -> Any:
        return {"runs": [r.describe() for r in runs], "limits": limits}

    @app.post("/api/predict")
    async def predict(request: Request, run: int = 0, heatmap: int = 1) -> Any:
        name = unquote(request.headers.get("x-filename", "")) or "upload"
        name = name.replace("\\", "/").rsplit("/", 1)[-1][:200]
        if not 0 <= run < len(runs):
            return error(400, name, f"unknown run {run}; choose 0..{len(runs) - 1}")
        too_big = (f"{name} is larger than the {max_bytes / 1e6:g} MB limit per image; "
                   "downscale it or raise --max-mb")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return error(413, name, too_big)
        buf = bytearray()
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > max_bytes:
                return error(413, name, too_big)
        if not buf:
            return error(422, name, f"{name} is empty (0 bytes)")
        try:
            return await run_in_threadpool(predict_upload, runs[run], bytes(buf), name,
                                           bool(heatmap))
        except ImageError as exc:
            status = 415 if "not a recognised image" in str(exc) or "not accepted" in str(
                exc) else 422
            return error(status, name, f"{name}: {exc} (accepted: {', '.join(FORMATS)}, up "
                                       f"to {max_bytes / 1e6:g} MB)")
        finally:
            buf.clear()

    return app


def is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
