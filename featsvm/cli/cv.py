"""`featsvm cv`: pooled, grouped K-fold cross-validation of a head over every image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from featsvm.cli import options
from featsvm.names import HEADS

_COLS = (
    ("accuracy", ("accuracy",)),
    ("balanced acc.", ("balanced_accuracy",)),
    ("sensitivity", ("binary", "sensitivity")),
    ("specificity", ("binary", "specificity")),
    ("precision", ("binary", "precision")),
    ("macro-F1", ("macro_f1",)),
    ("ROC-AUC (mal.)", ("binary", "roc_auc")),
)


def _get(block: dict[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        block = block.get(p) if isinstance(block, dict) else None  # type: ignore[assignment]
    return block


def summary(metrics: dict[str, Any]) -> str:
    """Pooled value [95 % CI] and the per-fold mean ± sd, min-max of the main metrics (%)."""
    pooled = metrics["pooled"]
    ci = pooled.get("ci95", {})
    spread = metrics.get("fold_spread", {})
    lines = [f"{'metric':<15} {'pooled [95 % CI]':<24} folds: mean ± sd (min-max)"]
    for name, path in _COLS:
        v = _get(pooled, path)
        c = ci.get(".".join(path))
        text = "n/a" if v is None else f"{100 * v:.2f}"
        if v is not None and c:
            text += f" [{100 * c[0]:.1f}, {100 * c[1]:.1f}]"
        s = spread.get(".".join(path))
        fold = (f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} ({100 * s['min']:.1f}-"
                f"{100 * s['max']:.1f})" if s else "")
        lines.append(f"{name:<15} {text:<24} {fold}")
    return "\n".join(lines)


@click.command("cv")
@options.backbone(help="Backbone (or baseline) whose cached embeddings to use.")
@click.option("--head", type=click.Choice(HEADS), required=True)
@click.option("--folds", default=10, show_default=True, type=click.IntRange(2),
              help="Outer folds (grouped, stratified) over all images of the manifest.")
@options.split(help="Split manifest CSV (its images, labels and duplicate groups are used; "
               "its train/val/test column is not).")
@click.option("--layer", default=None, help="Embedding layer the cache was extracted at.")
@options.weights(help="Weights the cache was built with: a local state_dict file, 'none' or "
                 "'default' (as given to featsvm extract).")
@options.weights_dir()
@options.cache(help="Feature cache folder (written by featsvm extract).")
@options.runs()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML file: its [fit] section with [cv] overrides (e.g. a smaller grid).")
@options.precision(help="Precision the cache was extracted with.")
@options.engine(help="Engine the cache was extracted with.")
@options.image_options(made=" the cache was extracted with")
@options.backend()
@options.quiet()
def command(
    backbone: str, head: str, folds: int, split_path: Path, layer: str | None,
    weights: str | None, weights_dir: str | None, cache_dir: str, runs_dir: Path,
    config_path: Path | None, precision: str, engine: str, view: str, stain: str, colour: str,
    mask_annotation: bool, cell_resolution: int, backend: str | None,
) -> None:
    """Score every image of the split manifest out of fold: K grouped, stratified folds, the
    head tuned inside each fold's training part, metrics over the pooled predictions with
    95 % CIs by bootstrap over duplicate groups. Writes a run record of kind 'cv'."""
    from featsvm.features.engines import cache_tag
    from featsvm.features.preprocess import resolve_options
    from featsvm.models.cv import cross_validate, load_cv_head_config

    cfg = load_cv_head_config(config_path)
    if backend is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, backend=backend)
    prep = resolve_options(view, stain, colour, split_path,
                           mask_annotation=mask_annotation, cell_resolution=cell_resolution)
    rec = cross_validate(backbone, head, split_path, cache_dir=cache_dir, weights=weights,
                         weights_dir=weights_dir, runs_dir=runs_dir, config=cfg, folds=folds,
                         precision=cache_tag(engine, precision, backbone=backbone),
                         layer=layer,
                         progress=options.progress(), options=prep)
    c = rec.config
    pooled = rec.metrics["pooled"]
    click.echo(f"{c['model']}  ({c['weights']['label']}); {folds}-fold CV over "
               f"{pooled['n']} images in {pooled['n_groups']} groups")
    click.echo(summary(rec.metrics) + "\n(%, 95 % CI by bootstrap over duplicate groups)")
    click.echo(f"cv {c['timing']['fit_seconds']:.1f} s; run record: {rec.path}")
