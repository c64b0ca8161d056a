"""What a training run prints: messages, the selection notice, epoch lines and the progress bar.

Only rank 0 speaks (``verbose`` is false elsewhere); the bar goes to stderr, and only when
asked for or when stderr is a terminal. Printed times and speeds are never written to a file.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

from streamnn.run.folder import BEST

#: Relative change of the training loss below which it "never moved".
STILL_LOSS = 1e-6


class Console:
    """The run's output: ``echo`` (default: print) when ``verbose``, and a progress bar when ``progress``."""

    def __init__(self, verbose: bool, echo: Callable[[str], None] | None = None,
                 progress: bool | None = None) -> None:
        self.verbose = verbose
        self.echo = echo or (lambda msg: print(msg, flush=True))
        self.progress = self.verbose and (sys.stderr.isatty() if progress is None else progress)

    def say(self, message: str) -> None:
        if self.verbose:
            self.echo(message)

    def selection(self, cfg: dict[str, Any], selection: str, n_val: int, epoch: int, epoch_step: int,
                  step: int) -> None:
        """Which accuracy selects checkpoint-best.h5, and where a resumed run continues."""
        what = {"val": f"the validation part ({cfg['val_fraction']:g} of {cfg['train_split']!r}: "
                       f"{n_val} rows, seeded)",
                "eval": f"the {cfg['eval_split']!r} split (its accuracy is then optimistic: use --val-fraction "
                        "to keep test numbers unbiased)",
                "train": "training accuracy (no validation or evaluation data)"}[selection]
        self.say(f"{BEST} is selected on {what}")
        if epoch or epoch_step:
            self.say(f"resuming at epoch {epoch + 1}, step {step}")

    def epoch_line(self, cfg: dict[str, Any], row: dict[str, float], seconds: float, speed: float | None) -> None:
        """One line per epoch: its metrics, learning rate, time and speed, and whether it is the best."""
        parts = [f"epoch {int(row['epoch'])}/{cfg['epochs']}",
                 f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"]
        if not math.isnan(row["val_accuracy"]):
            parts.append(f"val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}")
        if not math.isnan(row["eval_accuracy"]):
            parts.append(f"{cfg['eval_split']} loss {row['eval_loss']:.4f} acc {row['eval_accuracy']:.4f}")
        parts += [f"lr {row['lr']:.3g}", f"{seconds:.1f}s"]
        if speed:
            parts.append(f"{speed:.0f} samples/s")
        self.say("  ".join(parts) + ("  *best" if row["best"] == 1.0 else ""))

    @contextlib.contextmanager
    def progressbar(self, n_steps: int, epoch: int, epochs: int, done: int) -> Iterator[Any]:
        """A bar over an epoch's ``n_steps`` steps (``done`` of them already), or None."""
        if not self.progress:
            yield None
            return
        import click

        def show(item: Any) -> str:
            return "" if item is None else f"loss {item[0]:.4f}  {item[1]:.0f} samples/s"

        with click.progressbar(length=n_steps, label=f"epoch {epoch + 1}/{epochs}",
                               item_show_func=show, file=sys.stderr, show_eta=True) as bar:
            if done:
                bar.update(done)
            yield bar


def doubtful_result(cfg: dict[str, Any], history: dict[str, list[float]], step_losses: list[float]) -> list[str]:
    """Warning lines for a run that finished but learned nothing: a final accuracy of 0.0 on any split
    it measured, or a training loss that never moved (over the epochs, or over every step)."""
    warnings = []
    names = {"train_accuracy": f"training ({cfg['train_split']!r})", "val_accuracy": "validation",
             "eval_accuracy": f"{cfg['eval_split']!r}"}
    for column, name in names.items():
        values = history.get(column) or []
        if values and values[-1] == 0.0:
            warnings.append(f"warning: the final {name} accuracy is 0.0: every image is misclassified (do the "
                            "classes of the splits differ, or are the labels wrong?)")
    for what, losses in (("epochs", history.get("train_loss") or []), ("steps", step_losses)):
        finite = [v for v in losses if math.isfinite(v)]
        if len(finite) >= 2 and max(finite) - min(finite) <= STILL_LOSS * max(1.0, abs(finite[0])):
            warnings.append(f"warning: the training loss never moved ({finite[0]:.6g} over {len(finite)} {what}): "
                            "the model learned nothing (learning rate, initialization or data?)")
            break
    return warnings
