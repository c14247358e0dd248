"""`featsvm fit`: SVM / logistic-regression head on cached embeddings -> run record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from featsvm.cli import options
from featsvm.names import HEADS


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:.2f}"
    if ci:
        text += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return text


def results_table(metrics: dict[str, Any]) -> str:
    """A short plain-text table: accuracy, binary metrics and macro-F1 (%, with 95 % CI)."""
    cols = [
        ("accuracy", lambda b: b["accuracy"]),
        ("binary.sensitivity", lambda b: b["binary"]["sensitivity"]),
        ("binary.specificity", lambda b: b["binary"]["specificity"]),
        ("binary.precision", lambda b: b["binary"]["precision"]),
        ("macro_f1", lambda b: b["macro_f1"]),
    ]
    names = ["split", "n", "accuracy", "sensitivity", "specificity", "precision", "macro-F1"]
    lines = []
    for split in ("val", "test"):
        block = metrics.get(split)
        if not block:
            continue
        ci = block.get("ci95", {})
        lines.append([split, str(block["n"])] + [_fmt(get(block), ci.get(k)) for k, get in cols])
    widths = [max(len(r[i]) for r in [names, *lines]) for i in range(len(names))]
    out = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    return "\n".join(out)


@click.command("fit")
@options.backbone(help="Backbone whose cached embeddings to use.")
@click.option("--head", type=click.Choice(HEADS), required=True)
@options.weights(help="Weights the cache was built with: a local state_dict file, 'none' or "
                 "'default' (as given to featsvm extract).")
@options.weights_dir()
@options.cache(help="Feature cache folder (written by featsvm extract).")
@options.split()
@options.runs()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML file with a [fit] section (grids; defaults: configs/heads.toml).")
@options.precision(help="Precision the cache was extracted with.")
@options.engine(help="Engine the cache was extracted with.")
@click.option("--layer", default=None, help="Embedding layer the cache was extracted at.")
@options.image_options(made=" the cache was extracted with")
@options.backend()
@options.quiet()
def command(
    backbone: str, head: str, weights: str | None, weights_dir: str | None, cache_dir: str,
    split_path: Path, runs_dir: Path, config_path: Path | None, precision: str, engine: str,
    layer: str | None, view: str, stain: str, colour: str, mask_annotation: bool,
    cell_resolution: int, backend: str | None,
) -> None:
    """Tune HEAD by grouped CV on the train split of the cached BACKBONE embeddings, calibrate
    on val (SVM), score val and test once, and write a run record under --runs."""
    from featsvm.features.engines import cache_tag
    from featsvm.features.preprocess import resolve_options
    from featsvm.models.fit import fit
    from featsvm.models.heads import load_head_config

    cfg = load_head_config(config_path)
    if backend is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, backend=backend)
    prep = resolve_options(view, stain, colour, split_path,
                           mask_annotation=mask_annotation, cell_resolution=cell_resolution)
    rec = fit(backbone, head, split_path, cache_dir=cache_dir, weights=weights,
              weights_dir=weights_dir, runs_dir=runs_dir, config=cfg,
              precision=cache_tag(engine, precision, backbone=backbone), layer=layer,
              progress=options.progress(),
              options=prep)
    cfg_json = rec.config
    click.echo(f"{cfg_json['model']}  ({cfg_json['weights']['label']})")
    if cfg_json.get("not_imagenet_from"):
        click.echo(f"note: weights are not plain ImageNet from {cfg_json['not_imagenet_from']}")
    click.echo(f"hyperparameters: {cfg_json['hyperparameters']}  "
               f"(CV {cfg_json['cv']['scoring']} {cfg_json['cv']['best_score']:.4f})")
    click.echo(results_table(rec.metrics) + "   (%, 95 % CI over duplicate groups)")
    from featsvm.evaluation.ood import summary_line

    if cfg_json.get("ood"):
        click.echo(summary_line(cfg_json["ood"]))
    from featsvm.evaluation.trust import summary_lines

    for line in summary_lines(rec.metrics):
        click.echo(line)
    click.echo(f"fit {cfg_json['timing']['fit_seconds']:.1f} s; run record: {rec.path}")
