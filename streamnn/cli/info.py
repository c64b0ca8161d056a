"""``streamnn-info STORE``: describe a store; ``--grid PNG`` renders some of its images."""
from __future__ import annotations

import json
import os
from typing import Any

import click
import numpy as np

from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.data.format import FORMAT_VERSION, layout_text
from streamnn.data.store import Store, open_store, reading
from streamnn.cli.common import CONTEXT_SETTINGS, Command, cache_options, sigterm_as_interrupt, user_errors


def describe(store: Store) -> dict[str, Any]:
    """Everything ``streamnn-info`` shows, as JSON-able data."""
    with reading(store.path):
        compression = store.dataset(store.splits[0]).compression
    stats = store.stats()
    return {
        "path": path_text(store.path),
        "size_bytes": store.nbytes(),
        "shards": [path_text(p) for p in store.shards],
        "format_version": FORMAT_VERSION, "streamnn_version": store.streamnn_version, "created": store.created,
        "command": store.command, "class_names": store.class_names, "image_shape": list(store.image_shape),
        "channel_order": store.channel_order, "dtype": store.dtype, "scale": store.scale,
        "compression": compression, "counts": store.counts(),
        "layout": store.layout(max(store.splits, key=store.n_rows)),
        "stats": None if stats is None else {"split": store.options.get("stats_split"),
                                             "mean_of_means": float(np.mean(stats[0])),
                                             "mean_of_stds": float(np.mean(stats[1]))},
        "skipped": [{"path": p, "reason": r} for p, r in store.skipped()],
        "options": store.options, "fingerprint": store.fingerprint,
    }


def _text(d: dict[str, Any], max_skipped: int) -> str:
    h, w, c = d["image_shape"]
    mb = d["size_bytes"] / 1e6
    kind = (f"{d['dtype']} (raw pixels 0-255, scale 1/255)" if d["dtype"] == "uint8"
            else f"{d['dtype']} (pixel/255 in [0, 1])")
    lines = [f"store        {d['path']} ({mb:.1f} MB on disk)",
             f"created      {d['created']} by streamnn {d['streamnn_version']}",
             f"command      {d['command']}",
             f"classes      {', '.join(f'{i}={n}' for i, n in enumerate(d['class_names']))}",
             f"image        {h}x{w}x{c} {d['channel_order']}, row = HxWxC flattened ({h * w * c} values)",
             f"stored as    {kind}, {d['compression'] or 'uncompressed, contiguous'}",
             f"layout       {layout_text(d['layout'])}"]
    if d["shards"]:
        lines.append(f"shards       {len(d['shards'])} files in {os.path.dirname(d['shards'][0])}/ "
                     "(present and as the index recorded them)")
    names = d["class_names"]
    width = max(5, *(len(n) for n in names))
    lines.append("splits       " + "split".ljust(10) + "".join(n.rjust(width + 2) for n in names) + "total".rjust(9))
    for split, per in d["counts"].items():
        lines.append(" " * 13 + split.ljust(10) + "".join(str(per[n]).rjust(width + 2) for n in names)
                     + str(sum(per.values())).rjust(9))
    s = d["stats"]
    lines.append("stats        none" if s is None else
                 f"stats        per-feature mean/std of split {s['split']!r} "
                 f"(average mean {s['mean_of_means']:.4f}, average std {s['mean_of_stds']:.4f})")
    skipped = d["skipped"]
    lines.append(f"skipped      {len(skipped)} file(s)")
    lines += [f"             {k['path']}: {k['reason']}" for k in skipped[:max_skipped]]
    if len(skipped) > max_skipped:
        lines.append(f"             ... and {len(skipped) - max_skipped} more (--all-skipped lists them)")
    opts = d["options"]
    keys = ("size", "grayscale", "resize", "interpolation", "exif_orientation", "reduced_decoding",
            "per_class", "seed", "max_pixels", "max_skip_fraction", "source_root")
    lines.append("options      " + ", ".join(f"{k}={opts[k]}" for k in keys if k in opts))
    for warning in opts.get("warnings", []):
        lines.append(f"warning      {warning}")
    lines.append(f"fingerprint  {d['fingerprint']}")
    return "\n".join(lines)


def render_grid(store: Store, split: str, n: int, path: str) -> int:
    """Save the first ``n`` rows of ``split`` (already shuffled at packing) with class names."""
    count = min(n, store.n_rows(split))
    if count == 0:
        raise StreamnnError(f"split {split!r} is empty, nothing to draw", path_text(store.path))
    from streamnn.run.plots import save_image_grid  # matplotlib only when a grid is asked for
    rows = store.read_rows(split, np.arange(count))
    labels = store.labels(split)[:count]
    titles = [store.class_names[i] for i in labels]
    try:
        save_image_grid(store.images(rows), titles, path,
                        channel_order="RGB" if store.channel_order == "RGB" else "BGR",
                        title=f"{path_text(os.path.basename(store.path))}: {split}, first {count} rows")
    except ValueError as exc:
        raise StreamnnError(f"cannot save the grid ({exc})", path_text(path)) from None
    return count


@cache_options
@click.command(cls=Command, context_settings=CONTEXT_SETTINGS)
@click.argument("store", type=click.Path(path_type=str))
@click.option("--grid", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also save a grid of stored images with their class names to this PNG (or .pdf/.svg).")
@click.option("--split", default=None, help="Split drawn by --grid (default: train, else the first).")
@click.option("--n", "n_images", type=click.IntRange(min=1), default=32, show_default=True,
              help="Number of images in the grid.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON (for scripts).")
@click.option("--all-skipped", is_flag=True, help="List every skipped file (default: the first 20).")
@click.option("--verify", is_flag=True, help="Recompute the fingerprint (and every shard's) and fail if the store was altered.")
def main(store: str, grid: str | None, split: str | None, n_images: int, as_json: bool,
         all_skipped: bool, verify: bool) -> None:
    """Describe the streamnn store STORE: splits, counts per class, image shape, dtype, size
    on disk, skipped files, the packing command and options, and the fingerprint."""
    with sigterm_as_interrupt(), user_errors():
        if grid:
            from streamnn.run.plots import check_figure_path

            check_figure_path(grid)
        with open_store(store) as s:
            if verify:
                s.verify()
            d = describe(s)
            if grid:
                split = split or ("train" if "train" in s.splits else s.splits[0])
                d["grid"] = {"path": path_text(grid), "split": split,
                              "images": render_grid(s, split, n_images, grid)}
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(_text(d, max_skipped=len(d["skipped"]) if all_skipped else 20))
    if verify:
        click.echo("verified     content matches the fingerprint" + (" (and every shard its own)" if d["shards"] else ""))
    if grid:
        g = d["grid"]
        click.echo(f"grid         {g['images']} images of {g['split']!r} saved to {g['path']}")


if __name__ == "__main__":
    main()
