"""`featsvm extract`: embed an image folder with one backbone into the HDF5 feature cache."""

from __future__ import annotations

import click

from featsvm.cli import options
from featsvm.names import COLOURS, STAINS, VIEWS


@click.command("extract")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@options.backbone(help="Pretrained CNN to embed with.")
@options.weights()
@options.weights_dir()
@options.cache()
@options.device()
@options.precision()
@click.option("--batch-size", default=None, type=click.IntRange(1),
              help="Images per forward pass (default: the backbone's fastest CPU batch, e.g. 4 "
              "for VGG16, 32 for AlexNet; 64 on an accelerator).")
@click.option("--workers", default=None, type=click.IntRange(0),
              help="DataLoader worker processes (default: 1 on small CPUs, more on GPU); with "
              "--engine ray: Ray actors (default: the cluster's CPUs, or its GPUs / "
              "--gpus-per-worker).")
@options.engine()
@click.option("--address", default=None, metavar="auto|HOST:PORT",
              help="--engine ray: the Ray cluster to join (default: RAY_ADDRESS, else a local "
              "one on this machine's cores).")
@click.option("--gpus-per-worker", default=0.0, show_default=True, type=click.FloatRange(0),
              help="--engine ray: GPUs per actor (e.g. 0.5 = two actors share a GPU).")
@click.option("--layer", default=None,
              help="Embedding layer (default: penultimate if pretrained, see docs), e.g. "
              "vgg16: fc7|gap|logits, inception_v3: avgpool|mixed_6c|logits.")
@click.option("--view", default="field", show_default=True, type=click.Choice(VIEWS),
              help="field: the whole image; cells: the white cells found in it, cropped at a "
              "normalised scale on black, their embeddings averaged per image.")
@click.option("--stain", default="none", show_default=True, type=click.Choice(STAINS),
              help="reinhard: normalise colours to a reference taken from the TRAIN images of "
              "--split (kept next to it).")
@click.option("--colour", default="rgb", show_default=True, type=click.Choice(COLOURS),
              help="grey / hematoxylin: colour-free input, to measure what colour carries.")
@click.option("--split", "split_path", default=None, type=click.Path(dir_okay=False),
              help="Split manifest (needed by --stain reinhard for its reference, and by "
              "--precision int8, calibrated on its train images).")
@click.option("--mask-annotation", is_flag=True,
              help="Fill the burnt-in scale-annotation box (bottom-right 25 % x 20 %) with the "
              "image's median colour first (part of the cache fingerprint).")
@options.cell_resolution()
@options.quiet()
def command(data_dir, backbone, weights, weights_dir, cache_dir, device, precision, batch_size,
            workers, engine, address, gpus_per_worker, layer, view, stain, colour, split_path,
            mask_annotation, cell_resolution) -> None:
    """Embed every image of DATA_DIR with BACKBONE into CACHE (only images not cached yet)."""
    from featsvm.features.preprocess import resolve_options

    prep = resolve_options(view, stain, colour, split_path, data_dir, mask_annotation,
                           cell_resolution)
    common = dict(weights=weights, weights_dir=weights_dir, cache_dir=cache_dir, device=device,
                  precision=precision, batch_size=batch_size, layer=layer,
                  progress=options.progress(), options=prep)
    if engine == "ray":  # the only place that imports Ray
        from featsvm.features.ray_extract import extract_ray

        s = extract_ray(data_dir, backbone, address=address, workers=workers,
                        gpus_per_worker=gpus_per_worker, **common)
    else:
        if address is not None or gpus_per_worker:
            raise click.UsageError("--address and --gpus-per-worker need --engine ray")
        from featsvm.features.extract import extract

        split_rows = None
        if precision == "int8" and split_path is not None:  # int8: calibrated on train rows
            from featsvm.data.manifest import read_manifest

            split_rows = read_manifest(split_path).rows
        s = extract(data_dir, backbone, workers=workers, engine=engine, split_rows=split_rows,
                    **common)
    click.echo(f"cache:     {s.cache_path}")
    click.echo(f"backbone:  {s.backbone} layer {s.layer} ({s.dim}-d), {s.precision} on {s.device}")
    probe = (getattr(s, "precision_choice", None) or {}).get("cpu_probe")
    if probe is not None:
        click.echo(f"precision: auto -> {s.precision_choice['resolved']} (CPU "
                   + ("has native bf16: " + ", ".join(probe["bf16_flags"]) if probe["native_bf16"]
                      else "has no native bf16") + ")")
    click.echo(f"input:     {prep.describe()}")
    click.echo(f"weights:   {s.weights_label}"
               + (f" (sha256 {s.weights_sha256[:12]}…)" if s.weights_sha256 else ""))
    click.echo(f"images:    {s.n_total} records: {s.n_new} computed, {s.n_cached} already cached, "
               f"{s.n_duplicates} duplicate files")
    rate = f", {s.images_per_s:.1f} images/s" if s.n_new else ""
    click.echo(f"time:      {s.seconds:.1f} s total{rate}")
    if s.skipped:
        click.echo(f"skipped {len(s.skipped)} file(s):")
        for rel, reason in s.skipped:
            click.echo(f"  {rel}: {reason}")
