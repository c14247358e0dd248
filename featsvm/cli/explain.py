"""`featsvm explain`: heatmaps of where a run's model looks."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options

METHODS = ("auto", "gradcam", "cam", "occlusion")  # featsvm.explain.METHODS (a test checks)


@click.command("explain")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="Run folder (runs/<run-id>). Load only runs you trust.")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Folder for the PNGs (images) or the where-it-looks files (--split; "
                   "default <run>/explain).")
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
              help="auto: gradcam for end-to-end runs, cam for linear heads on pooled conv "
                   "features, occlusion otherwise.")
@click.option("--target", default=None,
              help="Explain this class (benign, early_pre_b, pre_b, pro_b) instead of the "
                   "predicted one.")
@click.option("--split", default=None,
              help="Instead of INPUTS: every image of this split of the run's predictions "
                   "(e.g. test): where-it-looks table, randomisation check, example panel.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="Image folder of the run (with --split; default: the recorded one).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="With --split: at most this many images (round-robin over classes).")
@click.option("--patch", type=click.IntRange(min=1), default=None,
              help="Occlusion patch side in model pixels (default crop/7).")
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="Occlusion stride (default: the patch side).")
@options.weights(help="Backbone weights file of a head run.")
@options.weights_dir()
@options.device()
@options.quiet()
def command(run_dir: Path, inputs: tuple[Path, ...], out_dir: Path | None, method: str,
            target: str | None, split: str | None, data_dir: Path | None, limit: int | None,
            patch: int | None, stride: int | None, weights: str | None,
            weights_dir: str | None, device: str) -> None:
    """Heatmaps (PNG overlays) of where the run RUN_DIR looks in each image of INPUTS, or,
    with --split, the share of heat on white cells, background and the annotation corner."""
    from featsvm.errors import UsageError
    from featsvm.labels import LABELS

    if target is not None and target not in LABELS:
        raise UsageError(f"--target must be one of {', '.join(LABELS)}")
    if split is not None:
        if inputs:
            raise UsageError("give either INPUTS or --split, not both")
        from featsvm.explain import where_it_looks

        s = where_it_looks(run_dir, data_dir, split, method, limit, out_dir, weights=weights,
                           weights_dir=weights_dir, device=device, patch=patch, stride=stride,
                           progress=options.progress())
        click.echo(f"run {s['run_id']} ({s['model']}), {s['method']}, {s['n_images']} "
                   f"{split} image(s)")
        click.echo(f"{'':<12}{'heat':>8}{'area':>8}")
        for r in ("cells", "background", "corner"):
            click.echo(f"{r:<12}{s['share'][r]:>8.1%}{s['area'][r]:>8.1%}")
        for layers, rnd in s["randomisation"].items():
            click.echo(f"randomised weights ({layers}): Spearman with the trained maps, mean "
                       f"{rnd['spearman_mean']:.3f}, median {rnd['spearman_median']:.3f} over "
                       f"{rnd['n_images']} image(s)")
        click.echo(f"wrote {s['out_dir']}")
        return
    if not inputs:
        raise UsageError("name images (or folders), or use --split")
    if out_dir is None:
        raise UsageError("--out DIR is needed for the heatmap PNGs")
    from featsvm.explain import explain_files

    res = explain_files(run_dir, inputs, out_dir, method, target, weights, weights_dir, device,
                        patch, stride, progress=options.progress())
    click.echo(f"run {res.run_id}: {res.method}, {len(res.rows)} image(s)")
    for r in res.rows:
        click.echo(f"{r['heatmap']}: {r['pred_label']} P(malig.) {r['prob_malignant']:.3f}; "
                   f"heat on cells {r['cells']:.0%}, background {r['background']:.0%}, "
                   f"corner {r['corner']:.0%}")
    for f, why in res.skipped:
        click.echo(f"skipped {f}: {why}", err=True)
    if not res.rows:
        raise click.ClickException("no image could be explained")
    click.echo(f"wrote {out_dir}")
