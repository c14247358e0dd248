"""`featsvm split`: duplicate-aware, stratified train/val/test manifest."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


@click.command("split")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("split.csv"),
              show_default=True, help="Split manifest CSV to write.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ratios", default="0.8,0.1,0.1", show_default=True,
              help="train,val,test fractions.")
@click.option("--folds", type=int, default=None,
              help="Also assign a grouped stratified k-fold index inside train.")
@click.option("--subset", default=None,
              help="Sub-folder to read (e.g. Segmented) instead of the default Original/.")
@click.option("--class-map", multiple=True, metavar="FOLDER=LABEL",
              help="Map a class folder to a label (benign, early_pre_b, pre_b, pro_b).")
@options.quiet()
def command(data_dir: Path, out: Path, seed: int, ratios: str, folds: int | None,
            subset: str | None, class_map: tuple[str, ...]) -> None:
    """Group duplicates and re-captures, then split DATA_DIR into train/val/test."""
    from featsvm.data.dataset import parse_class_map
    from featsvm.data.split import make_split, pairs_path, parse_ratios, summary_lines

    result = make_split(
        data_dir, out, seed=seed, ratios=parse_ratios(ratios), folds=folds, subset=subset,
        class_map=parse_class_map(class_map), progress=options.progress(),
    )
    for line in summary_lines(result):
        click.echo(line)
    click.echo(f"wrote {out} and {pairs_path(out)}")
