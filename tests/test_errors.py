"""Each user error named in the architecture issue ends in a one-line message and exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_dataset

from featsvm.cli import main
from featsvm.errors import ConfigError, RunRecordError
from featsvm.runs import list_runs, read_run


def _one_line_failure(args: list[str]) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_predict_on_cuda_without_a_gpu(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "x.jpg").write_bytes(b"")
    msg = _one_line_failure(["predict", "--run", str(run), "--device", "cuda", str(run)])
    assert "cuda" in msg.lower()


def test_config_value_of_the_wrong_type(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[finetune]\nepochs = "15"\n', encoding="utf-8")
    data = make_dataset(tmp_path / "data", per_class=2, size=32)
    msg = _one_line_failure(["finetune", str(data), "--split", str(tmp_path / "s.csv"),
                             "--config", str(cfg)])
    assert "epochs" in msg and "expected int" in msg and "bad.toml" in msg


def test_unknown_key_and_wrong_type_in_a_study_config(tmp_path: Path) -> None:
    cfg = tmp_path / "study.toml"
    cfg.write_text("[study]\nseed = 0.5\n", encoding="utf-8")
    msg = _one_line_failure(["run", str(cfg), "--data", str(tmp_path)])
    assert "[study].seed" in msg and "expected int" in msg
    cfg.write_text("[fit]\ncv_fold = 3\n", encoding="utf-8")
    msg = _one_line_failure(["run", str(cfg), "--data", str(tmp_path)])
    assert "cv_fold" in msg and "unknown key" in msg


def test_one_unreadable_metrics_json_is_skipped_not_fatal(tmp_path: Path) -> None:
    from test_report import make_split, write_fake_run

    data = make_dataset(tmp_path / "data", per_class=6, size=32)
    split = make_split(data, tmp_path / "split.csv")
    runs = tmp_path / "runs"
    good = write_fake_run(runs, split, model="vgg16 + svm", seed=1, skill=3.0)
    bad = write_fake_run(runs, split, model="vgg16 + logreg", head="logreg", seed=2, skill=1.0)
    (bad / "metrics.json").write_text("{", encoding="utf-8")
    with pytest.raises(RunRecordError, match="metrics.json"):
        read_run(bad)
    found, skipped = list_runs(runs)
    assert [r.path for r in found] == [good]
    assert len(skipped) == 1 and skipped[0].startswith(bad.name)
    res = CliRunner().invoke(main, ["report", "--runs", str(runs), "--out",
                                    str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert f"broken run folder skipped: {bad.name}" in res.output
    table = json.loads((tmp_path / "report" / "table.json").read_text())
    assert len([r for r in table["rows"] if r["source"] == "measured"]) == 1


def test_config_error_is_also_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
