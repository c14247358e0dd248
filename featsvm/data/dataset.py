"""Find labelled images in the known dataset layouts, hash them, and load them safely.

Layouts understood (paths relative to the folder the user names):

* the 3,256-image Kaggle release: ``Original/{Benign,Early,Pre,Pro}/`` (a parent that also
  holds ``Segmented/`` uses ``Original`` unless ``subset="Segmented"``);
* the 3,242-image "Blood Cells Cancer (ALL)" release: ``Blood cell Cancer [ALL]/{Benign,
  [Malignant] early Pre-B,[Malignant] Pre-B,[Malignant] Pro-B}/``;
* any folder with one sub-folder per class, named like the above or mapped by ``class_map``.

A file that is not a decodable image is reported (name + reason) and left out; one bad file
never stops the scan. That includes special files (a FIFO or a link to a device named like an
image: refused from ``fstat`` before any read, so nothing blocks or reads without end),
files over MAX_FILE_BYTES, images over MAX_PIXELS (refused from the header, before the file is
read), animated GIF/WebP/PNG files, and names that are not valid UTF-8 (shown with
backslash escapes, e.g. ``caf\\xe9.jpg``: they could not be written to a manifest).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featsvm.errors import ImageError, MissingInputError, UsageError
from featsvm.fileio import sha256_bytes
from featsvm.labels import LABELS, label_for_folder

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
)
# Refuse anything larger than this many pixels before decoding it (a decompression bomb
# guard; the largest real frames are 1024x768 = 0.8 MP, camera originals a few MP).
MAX_PIXELS = 50_000_000
# Refuse files larger than this before reading them (50 MP of 16-bit RGB is 300 MB).
MAX_FILE_BYTES = 512 * 1024 * 1024
_ANIMATED_FORMATS = ("GIF", "WEBP", "PNG")

RELEASE_WRAPPERS = ("Original", "Blood cell Cancer [ALL]")


@dataclass(frozen=True)
class ImageRecord:
    relpath: str  # POSIX path relative to the data folder the user named
    sha256: str
    label: str
    width: int
    height: int


@dataclass
class ScanResult:
    root: Path
    layout: str  # "original-3256", "blood-cells-3242" or "class-folders"
    class_dir: Path  # the folder holding one sub-folder per class
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    ignored_folders: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {lab: sum(r.label == lab for r in self.records) for lab in LABELS}


def _too_many_pixels(w: int, h: int) -> ImageError:
    return ImageError(
        f"image is {w}x{h} = {w * h / 1e6:.0f} MP, over the {MAX_PIXELS / 1e6:.0f} MP "
        "limit (possible decompression bomb); downscale it first"
    )


def _decode(data: bytes, name: str) -> Image.Image:
    """Open and fully decode image bytes, refusing bombs, returning a PIL image."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise _too_many_pixels(w, h)
            if im.format in _ANIMATED_FORMATS and getattr(im, "is_animated", False):
                raise ImageError(
                    f"animated {im.format} ({getattr(im, 'n_frames', '?')} frames): featsvm "
                    "needs one still image per file; save the frame you want as PNG"
                )
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a possible decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image format (corrupt, or not an image)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot decode: {exc}") from exc
    return im


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISDIR, "a folder"))


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of one image file, read with bounds: special files (FIFO, device, socket)
    are refused from ``fstat`` without a read (opened non-blocking, so a FIFO never hangs),
    files over MAX_FILE_BYTES by their size, images over MAX_PIXELS from their header,
    all before the file is read. Raises ImageError naming the problem."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _FILE_KINDS if test(mode)), "not a regular file")
            raise ImageError(f"{kind}, not an image file; skipped without reading it")
        size = os.fstat(fd).st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(f"file is {size / 1e6:,.0f} MB, larger than the "
                             f"{MAX_FILE_BYTES / 1e6:,.0f} MB limit for one image")
        try:  # the pixel guard reads the header only
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                w, h = Image.open(f).size
        except (Image.DecompressionBombError, Image.UnidentifiedImageError, OSError,
                SyntaxError, ValueError, EOFError):
            w = h = 0  # let _decode name the problem from the bytes
        if w * h > MAX_PIXELS:
            raise _too_many_pixels(w, h)
        try:
            f.seek(0)
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ImageError(f"cannot read file: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"file grew past the {MAX_FILE_BYTES / 1e6:,.0f} MB limit while read")
    return data


def printable_name(name: str) -> str:
    """`name` as text that can be printed and written: bytes that are not UTF-8 (kept by
    Python as surrogate escapes) appear as backslash escapes, e.g. ``caf\\xe9.jpg``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def check_utf8_name(name: str) -> None:
    """Raise ImageError when a path is not valid UTF-8 (it could not go into a manifest)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ImageError("file name is not valid UTF-8; rename the file (e.g. with "
                         "`convmv -f latin1 -t utf8`) to use it") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, RGBA, P, CMYK, I;16, I, F ...) to 8-bit RGB.

    Transparent pixels are composited on white; 16-bit and float images are scaled by
    their own range so that they do not saturate.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip((arr - lo) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_rgb(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Image bytes (e.g. an upload, never written to disk) as 8-bit RGB; raises ImageError
    naming the problem. Also returns the format PIL found, as ``image.info["format"]``."""
    im = _decode(data, name)
    fmt = im.format
    rgb = to_rgb(im)
    rgb.info["format"] = fmt
    return rgb


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Load one image file as 8-bit RGB; raises ImageError naming the problem."""
    return decode_rgb(read_image_bytes(path), os.fspath(path))


def inspect_file(path: Path) -> tuple[str, int, int]:
    """(sha256, width, height) of a decodable image file; raises ImageError otherwise."""
    data = read_image_bytes(path)
    im = _decode(data, str(path))
    return sha256_bytes(data), im.size[0], im.size[1]


def find_class_dir(
    root: Path, subset: str | None = None, class_map: dict[str, str] | None = None
) -> tuple[Path, str]:
    """Locate the folder that holds one sub-folder per class, and name the layout."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(
            f"data folder {root} does not exist. Download the Kaggle dataset 'Acute "
            "Lymphoblastic Leukemia (ALL) image dataset' (doi:10.34740/KAGGLE/DSV/2175623) "
            "and point featsvm at the folder holding Original/ (see README, 'Getting the data')."
        )
    if subset is not None:
        target = root / subset
        if not target.is_dir():
            raise MissingInputError(f"{root} has no sub-folder {subset!r}")
        return target, f"subset:{subset}"
    if (root / "Original").is_dir():
        return root / "Original", "original-3256"
    if (root / "Blood cell Cancer [ALL]").is_dir():
        return root / "Blood cell Cancer [ALL]", "blood-cells-3242"
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    if any(label_for_folder(d.name, class_map) for d in subdirs):
        return root, "class-folders"
    raise MissingInputError(
        f"no labelled images found under {root}: expected Original/<class>/, "
        "'Blood cell Cancer [ALL]'/<class>/ or one sub-folder per class "
        f"(known names: Benign, Early, Pre, Pro, ...; map others with --class-map FOLDER=LABEL, "
        f"labels {', '.join(LABELS)})"
    )


def iter_image_files(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


def scan(
    root: str | os.PathLike[str],
    subset: str | None = None,
    class_map: dict[str, str] | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> ScanResult:
    """Find, hash and verify every labelled image under `root`.

    Every file is fully decoded once, so truncated or fake images are found here and never
    reach a model. Records are sorted by relpath (deterministic).
    """
    root = Path(root)
    class_dir, layout = find_class_dir(root, subset, class_map)
    result = ScanResult(root=root, layout=layout, class_dir=class_dir)
    jobs: list[tuple[Path, str]] = []
    for sub in sorted(d for d in class_dir.iterdir() if d.is_dir()):
        label = label_for_folder(sub.name, class_map)
        if label is None:
            result.ignored_folders.append(printable_name(sub.relative_to(root).as_posix()))
            continue
        jobs.extend((p, label) for p in iter_image_files(sub))

    def work(job: tuple[Path, str]) -> ImageRecord | tuple[str, str]:
        path, label = job
        rel = path.relative_to(root).as_posix()
        try:
            check_utf8_name(rel)
            digest, w, h = inspect_file(path)
        except ImageError as exc:
            return (printable_name(rel), str(exc))
        return ImageRecord(rel, digest, label, w, h)

    n_workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        from tqdm import tqdm

        outcomes = tqdm(pool.map(work, jobs), total=len(jobs), desc="scan", unit="img",
                        leave=False, disable=not progress)
        for outcome in outcomes:
            if isinstance(outcome, ImageRecord):
                result.records.append(outcome)
            else:
                result.skipped.append(outcome)
    result.records.sort(key=lambda r: r.relpath)
    result.skipped.sort()
    return result


def parse_class_map(items: Iterable[str]) -> dict[str, str]:
    """Parse CLI `FOLDER=LABEL` items into a class map."""
    mapping: dict[str, str] = {}
    for item in items:
        folder, sep, label = item.partition("=")
        if not sep or not folder or not label:
            raise UsageError(f"--class-map expects FOLDER=LABEL, got {item!r}")
        if label not in LABELS:
            raise UsageError(f"--class-map {item!r}: label must be one of {', '.join(LABELS)}")
        mapping[folder] = label
    return mapping
