"""Nothing lost under faults (issue 16): full disk, kill -9 mid-write, broken files, no pickle.

Each test reproduces one fault first; the fault-injection figures are in benchmarks/faults.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from featsvm import fileio
from featsvm.errors import RunRecordError
from featsvm.runs import verify_sidecar, write_sidecar

# ---------------------------------------------------------------- atomic writes


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    fileio.write_json_atomic(tmp_path / "sub" / "config.json", {"a": 1})
    assert synced.count("file") >= 1 and synced.count("dir") >= 1
    assert synced.index("file") < len(synced) - 1 - synced[::-1].index("dir")  # file, then dir
    assert (tmp_path / "sub" / "config.json").read_text().strip().startswith("{")


def test_temp_files_of_killed_saves_are_removed(tmp_path: Path) -> None:
    # what a save killed between mkstemp and os.replace leaves behind
    stale = tmp_path / ".checkpoint-last.pt.abc123.tmp"
    stale.write_bytes(b"x" * 100)
    keep = tmp_path / "checkpoint-last.pt"
    keep.write_bytes(b"real")
    other = tmp_path / "notes.tmp"  # not one of ours
    other.write_bytes(b"")
    removed = fileio.remove_temp_files(tmp_path)
    assert removed == [stale]
    assert not stale.exists() and keep.exists() and other.exists()


# ---------------------------------------------------------------- run records


def test_empty_or_garbled_sidecar_is_a_run_record_error(tmp_path: Path) -> None:
    model = tmp_path / "model.skops"
    model.write_bytes(b"model bytes")
    write_sidecar(model)
    sidecar = tmp_path / "model.skops.sha256"
    for text in ("", "\n", "not-a-hash  model.skops\n"):
        sidecar.write_text(text, encoding="utf-8")
        with pytest.raises(RunRecordError, match="sidecar"):
            verify_sidecar(model)
