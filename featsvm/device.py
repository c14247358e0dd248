"""Pick the compute device and the autocast context for a requested precision.

``auto`` prefers CUDA, then Apple MPS, then the CPU. Asking for a device that is not there is
an error that says what is available, never a silent fallback (a user who asked for the GPU
wants to know it is not used).

Precision policy:

* ``fp32``: no autocast.
* ``bf16``: autocast to bfloat16 on CUDA, MPS and CPU. On CPUs without native bf16 (no
  ``avx512_bf16``/``amx``) it still runs, but usually slower than fp32: measure before using it.
* ``fp16``: autocast to float16 on CUDA and MPS only. On the CPU it is refused: CPU float16
  kernels are emulated (slow) and numerically weaker than bf16, so use ``bf16`` or ``fp32``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from featsvm.errors import DeviceError
from featsvm.names import DEVICES, PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.insert(0, "cuda")
    if _mps_available():
        out.insert(0 if "cuda" not in out else 1, "mps")
    return out


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a torch.device, refusing absent devices."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} requested but CUDA is not available here "
            f"(available: {', '.join(available_devices())}); use --device auto or --device cpu"
        )
    if kind == "mps" and not _mps_available():
        raise DeviceError(
            f"device {name!r} requested but Apple MPS is not available here "
            f"(available: {', '.join(available_devices())}); use --device auto or --device cpu"
        )
    return torch.device(name)


def check_precision(device: torch.device, precision: str) -> None:
    """Raise DeviceError for an unknown precision or fp16 on the CPU (see module doc)."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError(
            "fp16 is not supported on the CPU (emulated and less accurate than bf16); "
            "use --precision bf16 or --precision fp32"
        )


@contextlib.contextmanager
def autocast_context(device: torch.device | str, precision: str) -> Iterator[None]:
    """Context manager running the enclosed forward passes at `precision` on `device`."""
    device = torch.device(device)
    check_precision(device, precision)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield
