"""`featsvm predict`: classify new images with a finished run."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("predict")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="Run folder (runs/<run-id>) whose model to use. Load only runs you trust.")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_csv", type=click.Path(path_type=Path), default=None,
              help="Also write the table as CSV here.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Print file names relative to this folder.")
@click.option("--weights", default=None,
              help="Backbone weights file of a head run, when not found at its recorded path.")
@click.option("--weights-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with weights.toml (default: $FEATSVM_WEIGHTS_DIR).")
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda|mps")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(run_dir: Path, inputs: tuple[Path, ...], out_csv: Path | None,
            data_root: Path | None, weights: str | None, weights_dir: Path | None,
            device: str, batch_size: int, quiet: bool) -> None:
    """Predict the class of every image in INPUTS (files or folders) with the run RUN_DIR."""
    from featsvm.labels import LABELS
    from featsvm.predict import predict, write_predictions_csv

    res = predict(run_dir, inputs, weights=weights, weights_dir=weights_dir, device=device,
                  batch_size=batch_size, data_root=data_root, progress=not quiet)
    click.echo(f"run {res.run_id} ({res.model}): {len(res.predictions)} image(s)")
    if res.threshold is None:
        click.echo("this run has no abstention threshold (made before featsvm chose one on "
                   "val): nothing is marked abstain")
    else:
        n_abst = sum(bool(p.abstain) for p in res.predictions)
        click.echo(f"abstain = confidence (max probability) below {res.threshold:.4f}, chosen "
                   f"on the run's val split: {n_abst} of {len(res.predictions)} image(s)")
    if res.predictions:
        width = max(len("file"), *(len(p.file) for p in res.predictions))
        head = f"{'file':<{width}}  {'predicted':<12} {'P(malig.)':>9}  " + "  ".join(
            f"{lab:>11}" for lab in LABELS) + "  ood  abstain"
        click.echo(head)
        for p in res.predictions:
            ood = "-" if p.ood is None else ("yes" if p.ood else "no")
            mark = "-" if p.abstain is None else ("yes" if p.abstain else "no")
            click.echo(f"{p.file:<{width}}  {p.pred_label:<12} "
                       f"{p.prob_malignant:>9.4f}  " + "  ".join(f"{v:>11.4f}" for v in p.proba)
                       + f"  {ood:>3}  {mark:>7}")
        flagged = [p for p in res.predictions if p.ood]
        if any(p.ood is not None for p in res.predictions):
            click.echo(f"ood: {len(flagged)} of {len(res.predictions)} image(s) unlike the "
                       "run's training images (threshold: 95 % of its val images)")
    for f, why in res.skipped:
        click.echo(f"skipped {f}: {why}", err=True)
    if res.skipped:
        click.echo(f"{len(res.skipped)} file(s) skipped", err=True)
    if out_csv is not None:
        write_predictions_csv(res, out_csv)
        click.echo(f"wrote {out_csv}")
    if not res.predictions:
        raise click.ClickException("no image could be predicted")
