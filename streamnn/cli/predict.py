"""``streamnn-predict``: class and probability of image files, preprocessed exactly as packing did."""
from __future__ import annotations

import json
import os
import sys

import click

from streamnn.run.predict import TTA, iter_image_files, load_model, predict_files
from streamnn.paths import path_text
from streamnn.threads import use_threads
from streamnn.cli.common import CONTEXT_SETTINGS, Command, sigterm_as_interrupt, threads_option, user_errors


@click.command(cls=Command, context_settings=CONTEXT_SETTINGS)
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, metavar="IMAGE_OR_FOLDER...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines).")
@click.option("--tta", type=click.Choice(list(TTA)), default="none", show_default=True,
              help="Average the probabilities of each image and its mirror.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@threads_option("the CPUs this process may use")
def main(checkpoint: str, inputs: tuple[str, ...], as_json: bool, tta: str, batch_size: int,
         threads: str | int) -> None:
    """Predict the class of each image (folders are searched recursively).

    Prints `path<TAB>class<TAB>probability` per image; paths are printed in streamnn's
    lossless text form (a tab, a newline or a byte that is not UTF-8 is written as \\xNN, a
    backslash as \\\\). Unreadable files are reported on stderr, the others are still
    predicted, and the exit code is then 1 (so it is for an input that does not exist).
    """
    failures = done = 0
    with sigterm_as_interrupt(), user_errors():
        pred = load_model(checkpoint)
        use_threads(threads, model=pred.model)
        missing = [i for i in inputs if not os.path.lexists(i)]
        for item in missing:  # reported as such, not as an image that could not be read
            click.echo(f"Error: {path_text(item)}: no such file or folder", err=True)
        present = [i for i in inputs if i not in missing]
        if not present:
            sys.exit(1)
        for path, result, error in predict_files(pred, iter_image_files(present), tta=TTA[tta],
                                                 batch_size=batch_size):
            if error is not None:
                failures += 1
                click.echo(f"Error: {error}", err=True)
            elif as_json:
                done += 1
                click.echo(json.dumps({"path": path_text(path), **result}, allow_nan=False))
            else:
                done += 1
                click.echo(f"{path_text(path)}\t{result['class']}\t{result['probability']:.4f}")
    if failures or not done:
        click.echo(f"{failures} of {failures + done} images could not be read" if failures + done
                   else f"Error: {', '.join(path_text(i) for i in present)}: no image file found", err=True)
    if failures or not done or missing:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
