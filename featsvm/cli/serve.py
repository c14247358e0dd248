"""`featsvm serve`: a local web page to classify images with finished runs."""

from __future__ import annotations

from pathlib import Path

import click

from featsvm.cli import options


@click.command("serve")
@click.option("--run", "run_dirs", required=True, multiple=True,
              type=click.Path(path_type=Path),
              help="Run folder (runs/<run-id>); repeat for several runs to choose from. Load "
                   "only runs you trust.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default is reachable from this computer only.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-mb", default=20.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Largest image accepted, in MB.")
@click.option("--no-heatmap", is_flag=True, help="Do not compute heatmaps (faster).")
@options.weights(help="Backbone weights file of a head run.")
@options.weights_dir()
@options.device()
def command(run_dirs: tuple[Path, ...], host: str, port: int, max_mb: float, no_heatmap: bool,
            weights: str | None, weights_dir: str | None, device: str) -> None:
    """Serve a page on http://HOST:PORT/ where images dropped in the browser get the class,
    P(malignant), the run's abstain / OOD flags and a heatmap. Images stay in memory."""
    from featsvm.errors import UsageError

    try:
        import uvicorn

        from featsvm.serve.app import create_app, is_local, load_runs
    except ImportError as exc:
        raise UsageError(f"featsvm serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'featsvm[serve]'") from None
    runs = load_runs(list(run_dirs), weights, weights_dir, device, heatmaps=not no_heatmap)
    app = create_app(runs, max_bytes=int(max_mb * 1e6))
    for r in runs:
        click.echo(f"run {r.index}: {r.model} ({r.run_id})")
    if not is_local(host):
        click.echo(f"warning: listening on {host}: anyone who can reach this address can "
                   "upload images and use the models", err=True)
    click.echo(f"featsvm serve: open http://{host}:{port}/ (Ctrl+C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
