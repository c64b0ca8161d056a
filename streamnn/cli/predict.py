"""``streamnn-predict``: class and probability of image files, preprocessed exactly as packing did."""
from __future__ import annotations

import json
import sys

import click

from ..errors import StreamnnError
from ..evaluate import iter_image_files, load_predictor, predict_files


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, required=True, metavar="IMAGE_OR_FOLDER...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines).")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="Average the probabilities of each image and its mirror.")
@click.option("--batch-size", type=int, default=64, show_default=True)
def main(checkpoint: str, inputs: tuple[str, ...], as_json: bool, tta: str, batch_size: int) -> None:
    """Predict the class of each image (folders are searched recursively).

    Prints `path<TAB>class<TAB>probability` per image. Unreadable files are reported on
    stderr, the others are still predicted, and the exit code is then 1.
    """
    try:
        pred = load_predictor(checkpoint)
    except StreamnnError as exc:
        raise click.ClickException(str(exc)) from None
    failures = done = 0
    for path, result, error in predict_files(pred, iter_image_files(inputs), tta=tta == "flip",
                                             batch_size=batch_size):
        if error is not None:
            failures += 1
            click.echo(f"error: {error}", err=True)
        elif as_json:
            done += 1
            click.echo(json.dumps({"path": str(path), **result}))
        else:
            done += 1
            click.echo(f"{path}\t{result['class']}\t{result['probability']:.4f}")
    if failures or not done:
        click.echo(f"{failures} of {failures + done} images could not be read" if failures + done
                   else f"error: {', '.join(inputs)}: no image file found", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
