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
* ``auto`` (`resolve_precision`): on the CPU ``bf16`` where the CPU has native bf16
  instructions (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``; `probe_cpu`, done once per
  process and recorded by whoever resolves it), ``fp32`` otherwise; on CUDA ``bf16`` where the
  GPU supports it; ``fp32`` on MPS. A caller passes ``bf16_ok=False`` for a network whose
  bf16 features are measurably worse (a backbone spec's ``auto_bf16``): auto is then fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featsvm.errors import DeviceError
from featsvm.names import DEVICES, PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"
# CPU flags (/proc/cpuinfo) that mean native bf16 arithmetic (oneDNN uses them for bf16 GEMMs)
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 / AMX; Arm "bf16" feature
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")  # int8 dot products
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuProbe:
    """What `probe_cpu` found: the bf16 / int8 flags present and torch's CPU capability."""

    native_bf16: bool
    bf16_flags: tuple[str, ...]
    int8_flags: tuple[str, ...]
    capability: str  # torch.backends.cpu.get_cpu_capability(), e.g. "AVX512"
    machine: str  # platform.machine()
    source: str  # where the flags came from

    def to_json(self) -> dict[str, Any]:
        return {"native_bf16": self.native_bf16, "bf16_flags": list(self.bf16_flags),
                "int8_flags": list(self.int8_flags), "capability": self.capability,
                "machine": self.machine, "source": self.source}

    def describe(self) -> str:
        if self.native_bf16:
            return f"native bf16 ({', '.join(self.bf16_flags)})"
        return f"no native bf16 (torch CPU capability {self.capability})"


def cpu_flags(cpuinfo: Path | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty
    where there is no such file (macOS, Windows)."""
    try:
        text = (cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


@functools.cache
def probe_cpu() -> CpuProbe:
    """Probe once per process whether this CPU has native bf16 (and int8 dot products)."""
    flags = cpu_flags()
    getter = getattr(torch.backends.cpu, "get_cpu_capability", None)
    capability = str(getter()) if getter else "unknown"
    bf16 = tuple(f for f in BF16_FLAGS if f in flags)
    return CpuProbe(native_bf16=bool(bf16), bf16_flags=bf16,
                    int8_flags=tuple(f for f in INT8_FLAGS if f in flags),
                    capability=capability, machine=platform.machine(),
                    source=str(CPUINFO) if flags else "no CPU flag list here")


def resolve_precision(device: torch.device | str, precision: str, bf16_ok: bool = True) -> str:
    """The precision `auto` stands for on `device` (see the module doc); others unchanged.
    `bf16_ok` False: the network keeps fp32 under auto (its bf16 features fall short)."""
    if precision != AUTO:
        return precision
    if not bf16_ok:
        return "fp32"
    device = torch.device(device)
    if device.type == "cpu":
        return "bf16" if probe_cpu().native_bf16 else "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def precision_record(device: torch.device | str, requested: str, bf16_ok: bool = True
                     ) -> dict[str, Any]:
    """What a cache or run record keeps about a precision choice: the request, what it
    resolved to and, for ``auto`` on a CPU, the probe behind it (and whether the network
    itself kept fp32)."""
    out: dict[str, Any] = {"requested": requested,
                           "resolved": resolve_precision(device, requested, bf16_ok)}
    if requested == AUTO and torch.device(device).type == "cpu":
        out["cpu_probe"] = probe_cpu().to_json()
    if requested == AUTO and not bf16_ok:
        out["network_keeps_fp32"] = True  # its bf16 features fall short (backbone spec)
    return out


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
    """Raise DeviceError for an unknown precision or fp16 on the CPU (see module doc);
    ``auto`` is checked as what it resolves to."""
    precision = resolve_precision(device, precision)
    if precision == "int8":
        raise DeviceError("int8 is an inference precision of an exported graph: use it with "
                          "--engine onnxruntime or --engine openvino (torch runs fp32 or bf16)")
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
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield
