"""`featsvm finetune`: train an end-to-end CNN baseline and write a run record."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from featsvm.cli import options
from featsvm.names import MODELS

if TYPE_CHECKING:
    from featsvm.models.finetune import FinetuneConfig


@click.command("finetune")
@click.argument("data_dir", type=click.Path(path_type=Path))
@options.split(required=True, default=None, show_default=False)
@click.option("--model", type=click.Choice(MODELS), default=None,
              help="Model to train (default: [finetune] model of --config, else basic-cnn).")
@options.weights()
@options.weights_dir()
@click.option("--epochs", type=int, default=None, help="Maximum epochs.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None,
              help="Peak learning rate of the head (backbone: lr x backbone_lr_mult).")
@click.option("--freeze", default=None,
              help="none | all | auto (all but the last block) | a module name such as "
              "blocks.5, Mixed_7b, features.21: freeze everything up to and including it.")
@click.option("--cache-frozen/--no-cache-frozen", default=None,
              help="Run the frozen layers once and train on their stored outputs (CPU speed-up; "
              "augmentation limited to cached flips/rotations).")
@options.image_options(help_by_option={
    "view": "What the network sees: field (the whole image) or cells (each white cell cropped "
            "on black at a normalised scale, trained with its image's label; an image's "
            "probabilities are the mean of its cells'). Default: [finetune] input, else field.",
    "stain": "reinhard: normalise colours to a reference from the TRAIN images of --split.",
    "colour": "grey / hematoxylin: colour-free input."})
@click.option("--stain-jitter", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help="HED-space stain augmentation strength for training (0 = off; e.g. 0.05). "
              "Default: [finetune] stain_jitter, else 0.")
@click.option("--seed", type=int, default=None)
@click.option("--cv", "cv_folds", type=click.IntRange(2), default=None,
              help="Pooled, grouped K-fold cross-validation over every image of SPLIT instead "
              "(the folds of `featsvm cv`; about 0.9 x K trainings): one run record of kind cv.")
@options.device(default=None, show_default=False,
                help="Where to train (default: [finetune] device of --config, else auto).")
@options.precision(default=None, show_default=False,
                   help="Training precision (default: [finetune] precision, else fp32; "
                   "fp16 is refused on the CPU).")
@options.runs()
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML file; its [finetune] section (and [finetune.overrides.MODEL]).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), default=None,
              help="Continue this unfinished run folder from its last checkpoint.")
@click.option("--no-resume", is_flag=True,
              help="Start a new run even if an unfinished one with the same settings exists.")
@options.quiet()
def command(
    data_dir: Path, split_path: Path, model: str | None, weights: str | None,
    weights_dir: str | None, epochs: int | None, batch_size: int | None, lr: float | None,
    freeze: str | None, cache_frozen: bool | None, view: str, stain: str, colour: str,
    mask_annotation: bool, cell_resolution: int, stain_jitter: float | None, seed: int | None,
    cv_folds: int | None,
    device: str | None, precision: str | None,
    runs_dir: Path, config_path: Path | None, resume_dir: Path | None, no_resume: bool,
) -> None:
    """Train an end-to-end CNN (basic-cnn from scratch, or fine-tune a pretrained backbone)
    on the train split of SPLIT, select the epoch on val, score val and test.

    By default an unfinished run with identical settings under --runs is resumed from its
    last checkpoint (rerun the same command after an interruption); --no-resume starts anew.
    """
    from featsvm.config import load_toml
    from featsvm.models.finetune import FinetuneConfig, finetune, finetune_config

    try:
        base = (finetune_config(load_toml(config_path), str(config_path))
                if config_path else FinetuneConfig())
        cfg = base.for_model(model, epochs=epochs, batch_size=batch_size, lr=lr, freeze=freeze,
                             cache_frozen=cache_frozen, seed=seed, device=device,
                             precision=precision, stain_jitter=stain_jitter)
        prep = _image_options(view, stain, colour, mask_annotation, cell_resolution,
                              split_path, data_dir)
        resume: Path | bool = resume_dir if resume_dir is not None else not no_resume
        if cv_folds is not None:
            if prep is not None:
                from featsvm.errors import UsageError

                raise UsageError("finetune --cv trains on the whole field only: leave out "
                                 "--view/--stain/--colour/--mask-annotation/--cell-resolution")
            _cross_validate(data_dir, split_path, cfg, cv_folds, weights, weights_dir, runs_dir,
                            resume)
            return
        result = finetune(data_dir, split_path, cfg, weights=weights, weights_dir=weights_dir,
                          runs_dir=runs_dir, resume=resume, progress=options.progress(),
                          options=prep)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: the last finished epoch (and with --cv every finished fold) "
                   "is checkpointed; run the same command again to resume from it (or pass "
                   "--no-resume to start over)", err=True)
        raise SystemExit(130) from None
    rec = result.record
    assert rec is not None
    t = rec.config["timing"]
    click.echo(f"run record: {rec.path}")
    click.echo(f"input:      {rec.config['inputs']}")
    click.echo(f"epochs run {result.epochs_done}, best epoch {result.best_epoch} "
               f"(val {cfg.select_metric} {rec.config['best_val_score']:.4f}); training "
               f"{t['fit_seconds']:.0f} s, decoding {t['preload_seconds']:.0f} s")
    for split in ("val", "test"):
        block = rec.metrics.get(split)
        if not block:
            continue
        ci = block.get("ci95", {})
        b = block["binary"]

        def fmt(key: str, value: float | None, block_ci: dict = ci) -> str:
            lo_hi = block_ci.get(key)
            if value is None:
                return "n/a"
            return f"{value:.4f}" + (f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else "")

        click.echo(
            f"{split:>4} (n={block['n']}): accuracy {fmt('accuracy', block['accuracy'])}, "
            f"macro-F1 {fmt('macro_f1', block['macro_f1'])}, malignant sensitivity "
            f"{fmt('binary.sensitivity', b['sensitivity'])}, specificity "
            f"{fmt('binary.specificity', b['specificity'])}, precision "
            f"{fmt('binary.precision', b['precision'])}"
        )
    from featsvm.evaluation.ood import summary_line
    from featsvm.evaluation.trust import summary_lines

    for line in filter(None, [*summary_lines(rec.metrics), summary_line(rec.config.get("ood"))]):
        click.echo(line)
    if result.skipped:
        click.echo(f"{len(result.skipped)} image(s) skipped (listed in config.json 'skipped')")


def _image_options(view: str, stain: str, colour: str, mask_annotation: bool,
                   cell_resolution: int, split_path: Path, data_dir: Path) -> Any:
    """The image options given on the command line; None (the config's ``input``) when none
    is."""
    if (view, stain, colour, mask_annotation, cell_resolution) == ("field", "none", "rgb",
                                                                    False, 0):
        return None
    from featsvm.features.preprocess import resolve_options

    return resolve_options(view, stain, colour, split_path, data_dir, mask_annotation,
                           cell_resolution)


def _cross_validate(data_dir: Path, split_path: Path, cfg: FinetuneConfig, folds: int,
                    weights: str | None, weights_dir: str | None, runs_dir: Path,
                    resume: Path | bool) -> None:
    """`featsvm finetune --cv K`: `featsvm.models.finetune_cv.finetune_cv` and its summary."""
    from featsvm.cli.cv import summary
    from featsvm.models.finetune_cv import finetune_cv

    out = finetune_cv(data_dir, split_path, cfg, folds, weights=weights,
                      weights_dir=weights_dir, runs_dir=runs_dir, resume=resume,
                      progress=options.progress())
    rec = out.record
    c, pooled = rec.config, rec.metrics["pooled"]
    reused = folds - len(out.folds_trained)
    click.echo(f"{c['model']}  ({c['weights'].get('label', '')}); {folds}-fold CV over "
               f"{pooled['n']} images in {pooled['n_groups']} groups"
               + (f"; {reused} fold(s) read back from an earlier call" if reused else ""))
    click.echo(summary(rec.metrics) + "\n(%, 95 % CI by bootstrap over duplicate groups)")
    click.echo(f"training {c['timing']['fit_seconds']:.0f} s, decoding "
               f"{c['timing']['preload_seconds']:.0f} s; run record: {rec.path}")
    if out.skipped:
        click.echo(f"{len(out.skipped)} image(s) skipped (listed in config.json 'skipped')")
