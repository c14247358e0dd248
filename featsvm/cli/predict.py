"""`featsvm predict`: classify new images with a finished run."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


@click.command("predict")
@click.option("--run", "run_dir", default=None, type=click.Path(path_type=Path),
              help="Run folder (runs/<run-id>) whose model to use (checked against its "
              "config.json; loading runs no code).")
@click.option("--onnx", "onnx_model", default=None, type=click.Path(path_type=Path),
              help="Instead of --run: a model written by `featsvm export`, run with ONNX "
              "Runtime only (no torch; optional extra featsvm[onnx]).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_csv", type=click.Path(path_type=Path), default=None,
              help="Also write the table as CSV here.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Print file names relative to this folder.")
@options.weights(help="Backbone weights file of a head run, when not found at its recorded "
                 "path.")
@options.weights_dir()
@options.device()
@options.engine(default=None, show_default=False,
                help="What runs a head run's backbone: torch, onnxruntime or openvino (optional "
                "extra featsvm[onnx]). Default: the engine and precision the run's cache was "
                "made with (an int8 cache: its own quantised graph).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--trust-pickle", is_flag=True,
              help="Also load a head saved as a pickle (model.joblib) by older featsvm versions: "
              "loading it runs code from the file, so only for run folders you made.")
@options.quiet()
def command(run_dir: Path | None, onnx_model: Path | None, inputs: tuple[Path, ...],
            out_csv: Path | None,
            data_root: Path | None, weights: str | None, weights_dir: str | None,
            device: str, engine: str | None, batch_size: int, trust_pickle: bool) -> None:
    """Predict the class of every image in INPUTS (files or folders) with the run RUN_DIR
    (or the exported model ONNX_MODEL)."""
    from featsvm.labels import LABELS
    from featsvm.predict import write_predictions_csv

    if (run_dir is None) == (onnx_model is None):
        raise click.UsageError("give exactly one of --run RUN_DIR and --onnx MODEL")
    if onnx_model is not None:
        from featsvm.predict_onnx import predict_onnx

        res = predict_onnx(onnx_model, inputs, batch_size=batch_size, data_root=data_root,
                           progress=options.progress())
    else:
        from featsvm.predict import predict

        res = predict(run_dir, inputs, weights=weights, weights_dir=weights_dir, device=device,
                      batch_size=batch_size, data_root=data_root,
                      progress=options.progress(), trust_pickle=trust_pickle, engine=engine)
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
                       "run's training images (threshold: 95 % of its val images; an "
                       "ensemble's: flagged by any member)")
    for f, why in res.skipped:
        click.echo(f"skipped {f}: {why}", err=True)
    if res.skipped:
        click.echo(f"{len(res.skipped)} file(s) skipped", err=True)
    if out_csv is not None:
        write_predictions_csv(res, out_csv)
        click.echo(f"wrote {out_csv}")
    if not res.predictions:
        raise click.ClickException("no image could be predicted")
