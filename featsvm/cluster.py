"""Ray, the optional cluster engine: connect to (or start) a cluster, and joblib's Ray backend.

Ray is an optional extra (``pip install featsvm[ray]``). Nothing in featsvm imports it unless
a command asks for it (``featsvm extract --engine ray``, ``--backend ray`` on fit / cv /
``[fit] backend = "ray"``); every import of ``ray`` is inside a function here or in
`featsvm.features.ray_extract`.

`session` is re-entrant: inside an already initialised Ray (a test fixture, a notebook, a
driver that called ``ray.init`` itself) it uses that one and leaves it running; otherwise it
connects (``address``: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; ``None`` = the
``RAY_ADDRESS`` environment variable, else a new local cluster on this machine's cores) and
disconnects on the way out (a local cluster it started stops with it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from typing import Any

from featsvm.errors import UsageError
from featsvm.names import BACKENDS

INSTALL_HINT = "Ray is not installed: pip install 'featsvm[ray]' (or pip install ray)"


def require_ray() -> Any:
    """The `ray` module, or a UsageError saying how to install it."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError(INSTALL_HINT)
    import ray

    return ray


@contextlib.contextmanager
def session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Yield the `ray` module connected to a cluster (see the module doc). `num_cpus` caps a
    new local cluster (default: every core); it is ignored when connecting to one."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "log_to_driver": True}
    if address is None and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise UsageError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def joblib_backend(backend: str, n_jobs: int | None = None) -> Iterator[None]:
    """Run the joblib calls inside (scikit-learn's GridSearchCV, cross-validation folds) on
    `backend`: "local" = joblib's default processes, "ray" = joblib's Ray backend over the
    cluster of `session`. With `n_jobs` = 1 nothing runs in parallel, so no cluster is used."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "local" or n_jobs == 1:
        yield
        return
    import joblib

    with session():
        from ray.util.joblib import register_ray

        register_ray()
        with joblib.parallel_backend("ray"):
            yield
