"""`featsvm run`: the whole study (split, extract, fit, fine-tune, report) from one config."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


@click.command("run")
@click.argument("config_file", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Image folder (holding Original/); overrides [study] data.")
@options.backend(help="Where the heads' grid searches and CV folds run: local processes or "
                 "joblib's Ray backend (RAY_ADDRESS picks the cluster). Default: [fit] backend.")
@options.quiet()
def command(config_file: Path, data_dir: Path | None, backend: str | None) -> None:
    """Run the study in CONFIG_FILE, reusing every split, cache and run that already matches."""
    from featsvm.study import run_study, summary_lines

    res = run_study(config_file, data_dir, progress=options.progress(), backend=backend)
    click.echo("\n== summary")
    for line in summary_lines(res):
        click.echo(line)
    if res.report_dir is not None:
        table = res.report_dir / "table.md"
        if table.is_file():
            click.echo("\n" + table.read_text(encoding="utf-8"))
    if res.failed:
        raise click.ClickException(
            f"{len(res.failed)} step(s) failed: {', '.join(s.name for s in res.failed)}"
        )
