"""`featsvm evaluate`: external validation of a run on labelled folders of another lab."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


def _pct(v: object) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f} %"  # type: ignore[arg-type]


def _ci(block: dict, key: str) -> str:
    ci = (block.get("ci95") or {}).get(key)
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


@click.command("evaluate")
@click.option("--run", "run_dir", required=True, type=click.Path(path_type=Path),
              help="Run folder (runs/<run-id>) to evaluate. Load only runs you trust.")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--class-map", "class_map", multiple=True,
              help="FOLDER=LABEL[,FOLDER=LABEL...]; LABEL is malignant, benign or a subtype "
                   "(early_pre_b, pre_b, pro_b), e.g. all=malignant,hem=benign.")
@click.option("--subject-regex", default=None,
              help=r"Regex finding the subject (person) in each file path, group 1 if any, "
                   r"e.g. 'UID_(H?\d+)_'. CIs then resample subjects; without it, images.")
@click.option("--label-regex", default=None,
              help=r"Take each image's class from its path inside DIR instead of folder "
                   r"names: group 1 of this regex (else the whole match), mapped by "
                   r"--class-map, e.g. '_([01])\.tif$' with --class-map 1=malignant,0=benign "
                   r"(ALL-IDB2). Images it does not match are left out and listed.")
@click.option("--labels", "labels_csv", default=None, type=click.Path(path_type=Path),
              help="Take the classes from a CSV with columns file (path relative to DIR; one "
                   "DIR), label (mapped by --class-map, or malignant/benign/a subtype) and "
                   "optionally subject (then no --subject-regex). Images under DIR it does "
                   "not name are left out and listed.")
@click.option("--name", default=None,
              help="Name of this external set (default: the first DIR's folder name); results "
                   "go to RUN/external/NAME/.")
@options.weights(help="Backbone weights file of a head run, when not found at its recorded "
                 "path.")
@options.weights_dir()
@options.device()
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--n-boot", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap resamples for the 95 % CIs (0 = none).")
@click.option("--seed", default=0, show_default=True, type=int)
@options.quiet()
def command(run_dir: Path, dirs: tuple[Path, ...], class_map: tuple[str, ...],
            subject_regex: str | None, label_regex: str | None, labels_csv: Path | None,
            name: str | None, weights: str | None,
            weights_dir: str | None, device: str, batch_size: int, n_boot: int,
            seed: int) -> None:
    """Evaluate the run RUN_DIR on labelled folders DIRS of another lab (evaluation only:
    nothing is fitted or chosen on them)."""
    from featsvm.evaluate import evaluate, parse_class_map

    res = evaluate(run_dir, dirs, class_map=parse_class_map(class_map),
                   subject_regex=subject_regex, label_regex=label_regex,
                   labels_csv=labels_csv, name=name, weights=weights,
                   weights_dir=weights_dir, device=device, batch_size=batch_size,
                   n_boot=n_boot, seed=seed, progress=options.progress())
    m = res.metrics
    unit = "subject(s)" if m["bootstrap"]["unit"] == "subject" else "image groups"
    click.echo(f"run {res.run_id} ({res.model}) on {res.name}: {m['n_images']} image(s) "
               f"({m['counts']['malignant']} malignant, {m['counts']['benign']} benign), "
               f"{m['n_subjects']} {unit}")
    click.echo(f"95 % CIs: bootstrap over {m['bootstrap']['unit']}s "
               f"({m['bootstrap']['n_boot']} resamples)"
               + ("" if m["bootstrap"]["unit"] == "subject" else
                  " - no --subject-regex (or subject column): cells of one person are "
                  "treated as independent, so the intervals are too narrow"))
    auc_ci = (m.get("ci95") or {}).get("roc_auc")
    click.echo("ROC-AUC P(malignant): "
               + ("n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}")
               + ("" if not auc_ci else f" [{auc_ci[0]:.3f}, {auc_ci[1]:.3f}]"))
    own, thr = m["own_decision"], m["at_threshold"]
    for title, b in (("own decision (arg-max class)", own),
                     ("at the val-chosen threshold (accepted images)", thr)):
        click.echo(f"{title}: sensitivity {_pct(b['sensitivity'])}{_ci(b, 'sensitivity')}, "
                   f"specificity {_pct(b['specificity'])}{_ci(b, 'specificity')}, "
                   f"precision {_pct(b['precision'])}{_ci(b, 'precision')}")
    if thr["threshold"] is None:
        click.echo("abstention: the run has no val-chosen threshold (made before featsvm chose "
                   "one); nothing abstained")
    else:
        click.echo(f"abstention (confidence < {thr['threshold']:.4f}): "
                   f"{_pct(thr['abstention_rate'])}{_ci(thr, 'abstention_rate')} "
                   f"(malignant {_pct(thr['abstention_rate_malignant'])}, benign "
                   f"{_pct(thr['abstention_rate_benign'])})")
    bc = m["calibration"]["binary"]
    click.echo(f"ECE (malignant vs benign, {bc['n_bins']} bins) "
               + ("n/a" if bc["ece"] is None else f"{bc['ece']:.3f}")
               + f", Brier {bc['brier']:.3f}")
    ood = m.get("ood") or {}
    if ood.get("available"):
        click.echo(f"out of distribution: {_pct(ood['rate'])}{_ci(ood, 'rate')} of the images "
                   f"flagged (malignant {_pct(ood['rate_malignant'])}, benign "
                   f"{_pct(ood['rate_benign'])}; in-lab test "
                   f"{_pct(ood.get('in_lab_test_rate'))})")
    else:
        click.echo(f"out of distribution: {ood.get('reason', 'not available')}")
    for f, why in res.skipped:
        click.echo(f"skipped {f}: {why}", err=True)
    for folder in res.ignored_folders:
        click.echo(f"ignored folder (no label; see --class-map): {folder}", err=True)
    click.echo(f"wrote {res.out_dir}/predictions.csv and metrics.json")
