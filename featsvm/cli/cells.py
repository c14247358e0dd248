"""`featsvm cells`: run the white-cell detector over a folder, list fields without a cell."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


@click.command("cells")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG contact sheet of sample fields with their detections drawn "
              "(it shows dataset pixels: keep it out of version control).")
@click.option("--n-preview", default=24, show_default=True, type=click.IntRange(1),
              help="Fields on the contact sheet.")
@click.option("--limit", default=None, type=click.IntRange(1),
              help="Survey a seeded random sample of this many images (default: all).")
@click.option("--seed", default=0, show_default=True)
@options.quiet()
def command(data_dir: Path, preview: Path | None, n_preview: int, limit: int | None,
            seed: int) -> None:
    """Find the white cells of every image under DATA_DIR (a segmented single-cell image is
    one cell); print how many, and every image where none was found."""
    from featsvm.features.cells import survey

    res = survey(data_dir, preview=preview, n_preview=n_preview, limit=limit, seed=seed,
                 progress=options.progress())
    click.echo(res.summary())
