"""``streamnn-eval``: loss, accuracy, per-class precision/recall and confusion matrix of a checkpoint."""
from __future__ import annotations

import json
from typing import Any

import click

from streamnn.dist import world
from streamnn.run.evaluate import evaluate_checkpoint
from streamnn.run.predict import TTA
from streamnn.paths import path_text
from streamnn.cli.common import CONTEXT_SETTINGS, Command, cache_options, sigterm_as_interrupt, threads_option, user_errors


@cache_options
@click.command(cls=Command, context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--split", default="test", show_default=True, help="Store split to evaluate.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--errors", "errors_png", type=click.Path(dir_okay=False), default=None,
              help="Write a grid of misclassified images to this PNG (or .pdf, .svg, ...); checked before "
                   "evaluating, and not written when no image is misclassified.")
@click.option("--max-errors", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images in the --errors grid (the count of all misclassified images is printed).")
@click.option("--tta", type=click.Choice(list(TTA)), default="none", show_default=True,
              help="Test-time augmentation: average the probabilities of each image and its mirror.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@threads_option("the CPUs this process may use (1 per rank under mpiexec)")
def main(checkpoint: str, store: str, split: str, as_json: bool, errors_png: str | None, max_errors: int,
         tta: str, batch_size: int, threads: str | int) -> None:
    """Evaluate CHECKPOINT on a split of STORE (streamed; memory does not grow with the split).

    Under `mpiexec -n K` every rank evaluates a share of the split and rank 0 prints the sums.
    """
    with sigterm_as_interrupt(), user_errors(ranks=True):
        comm = world()
        if errors_png:
            from streamnn.run.plots import check_figure_path

            check_figure_path(errors_png)
        summary, errors = evaluate_checkpoint(checkpoint, store, split, tta=TTA[tta], batch_size=batch_size,
                                              max_errors=max_errors if errors_png else 0, comm=comm,
                                              threads=threads)
        if errors_png:
            summary["errors_png"] = _save_errors(errors_png, errors, summary["channel_order"])
    if comm.rank == 0:
        click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


def _save_errors(path: str, errors: Any, channel_order: str) -> str | None:
    from streamnn.run.plots import save_image_grid

    if not errors.images:
        click.echo(f"no misclassified image: {path_text(path)} not written", err=True)
        return None
    save_image_grid(errors.images, errors.titles, path, channel_order="RGB" if channel_order == "RGB" else "BGR",
                    title="misclassified: true -> predicted (probability)")
    return path_text(path)


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable report."""
    names = s["class_names"]
    width = max(9, *(len(n) for n in names)) + 2
    lines = [f"{s['checkpoint']} on {s['store']} split {s['split']!r} ({s['n']} images"
             + (", flip TTA)" if s["tta"] else ")"),
             f"loss {s['loss']:.4f}  accuracy {s['accuracy']:.4f}", "",
             f"{'class':<{width}}{'precision':>10}{'recall':>10}{'support':>10}"]
    for n in names:
        c = s["per_class"][n]
        lines.append(f"{n:<{width}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['support']:>10d}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              " " * width + "".join(f"{n:>{width}}" for n in names)]
    for n, row in zip(names, s["confusion"]):
        lines.append(f"{n:<{width}}" + "".join(f"{v:>{width}d}" for v in row))
    if not s["same_store_as_training"]:
        lines.append("note: this store is not the one the checkpoint was trained on")
    if s.get("errors_png"):
        lines.append(f"misclassified: {s['misclassified']} (grid of the first ones in {s['errors_png']})")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    main()
