"""`featsvm export`: a head run's backbone, head and OOD flag as one ONNX file, with a parity
check."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


@click.command("export")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="Head run folder (runs/<run-id>) to export.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX file to write (the parity check goes next to it, .parity.json).")
@click.option("--data", "data_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="The run's image folder: check the export on the run's test split against "
              "its predictions.csv (else on a few synthetic images against the run's own "
              "predictor).")
@options.weights(help="Backbone weights file, when not found at the run's recorded path.")
@options.weights_dir()
@click.option("--trust-pickle", is_flag=True,
              help="Also load a head saved as a pickle by older featsvm versions (runs code).")
@options.quiet()
def command(run_dir: Path, out_path: Path, data_dir: Path | None, weights: str | None,
            weights_dir: str | None, trust_pickle: bool) -> None:
    """Write the run RUN_DIR (backbone + head, and its OOD flag when it has one) as one ONNX
    graph for `featsvm predict --onnx`; an int8 run's backbone is its own int8 graph."""
    from featsvm.export import export_run, parity_path

    res = export_run(run_dir, out_path, weights=weights, weights_dir=weights_dir,
                     data_dir=data_dir, trust_pickle=trust_pickle)
    p = res.parity
    agreement = "n/a" if p["agreement"] is None else f"{100 * p['agreement']:.2f} %"
    click.echo(f"wrote {res.path} ({res.path.stat().st_size / 1e6:.1f} MB) in {res.seconds:.1f} s")
    click.echo(f"parity on {p['images']} {p['on']} vs {p['against']}: agreement {agreement} "
               f"({p['n_disagree']} differ), max probability difference "
               f"{p['max_abs_prob_diff']:.2e}")
    run = p["run_precision"] if p["run_engine"] == "torch" else (
        f"{p['run_engine']} {p['run_precision']}")
    click.echo(f"backbone {p['backbone_precision']} (the run's features: {run})")
    if p["ood_in_graph"]:
        ood = "n/a" if p["ood_agreement"] is None else f"{100 * p['ood_agreement']:.2f} %"
        diff = p["max_abs_ood_score_diff"]
        click.echo(f"OOD flag in the graph (threshold {p['ood_threshold']:.3f}): agreement "
                   f"{ood} ({p['ood_n_disagree']} differ) vs the run's own predictor, max "
                   f"score difference {'n/a' if diff is None else f'{diff:.2e}'}")
    else:
        click.echo("no OOD flag in the graph (the run has none)")
    click.echo(f"parity stored in {parity_path(res.path)} and in the model's metadata")
