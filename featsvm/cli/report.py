"""`featsvm report`: tables, figures and an HTML page from every run record."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


@click.command("report")
@options.runs()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("report"),
              show_default=True, help="Folder to write the report into.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Image folder the runs were made from (for the example-image grid); "
              "default: a data_dir recorded in the runs, if it exists.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML file whose [report] table sets best / examples / split.")
def command(runs_dir: Path, out_dir: Path, data_dir: Path | None,
            config_file: Path | None) -> None:
    """Compare every run in RUNS: table (MD/CSV/JSON), figures (PNG) and index.html."""
    from featsvm.config import load_toml, section
    from featsvm.evaluation.report import ReportConfig, write_report

    cfg = (section(ReportConfig, load_toml(config_file), "report", str(config_file))
           if config_file else ReportConfig())
    res = write_report(runs_dir, out_dir, data_dir=data_dir, config=cfg)
    click.echo((out_dir / "table.md").read_text(encoding="utf-8"))
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {len(res.files)} files to {out_dir} (open {out_dir / 'index.html'})")
