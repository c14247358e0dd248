"""`featsvm ensemble`: a soft-vote ensemble of finished runs (mean of class probabilities)."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


@click.command("ensemble")
@click.argument("members", nargs=-1, required=True, metavar="RUN RUN [RUN...]")
@options.runs(help="Folder of run records: the ensemble's record is written here, and a RUN "
              "that is not a folder is looked up here by run id.")
@click.option("--name", default=None,
              help="Stem of the ensemble's run id (default: 'ensemble'; a date-time is added).")
@click.option("--target-error", default=None, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Deployable members: the error rate the abstention threshold aims at on the "
              "ensemble's val predictions (default: the members' common one, else 0.01).")
@options.quiet()
def command(members: tuple[str, ...], runs_dir: Path, name: str | None,
            target_error: float | None) -> None:
    """Combine finished runs (all `featsvm cv` runs, or all `fit` / `finetune` runs) into one
    run whose class probabilities are the unweighted mean of theirs, scored as its members
    were. Writes a run record of kind 'ensemble'."""
    from featsvm.ensemble import CV, make_ensemble

    rec = make_ensemble(members, runs_dir=runs_dir, name=name, target_error=target_error)
    c = rec.config
    click.echo(f"{c['model']}: {c['combine']} of {len(c['members'])} runs")
    if c["members_kind"] == CV:
        from featsvm.cli.cv import summary

        pooled = rec.metrics["pooled"]
        click.echo(f"{c['cv']['folds']}-fold CV over {pooled['n']} images in "
                   f"{pooled['n_groups']} groups (the members' folds)")
        click.echo(summary(rec.metrics) + "\n(%, 95 % CI by bootstrap over duplicate groups)")
    else:
        from featsvm.cli.fit import results_table
        from featsvm.evaluation.trust import summary_lines

        click.echo(results_table(rec.metrics) + "   (%, 95 % CI over duplicate groups)")
        for line in summary_lines(rec.metrics):
            click.echo(line)
        ood = c.get("ood")
        click.echo("OOD flag: " + (f"an image is flagged when any of {', '.join(ood['members'])} "
                                   "flags it" if ood else "none (no member has one)"))
    click.echo(f"run record: {rec.path}")
