"""``streamnn-train``: train a model on a store, resumably (see :mod:`streamnn.run.trainer`)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from streamnn.data.store import open_store
from streamnn.dist import Comm, agree, agreed, world
from streamnn.errors import StreamnnError
from streamnn.paths import path_text
from streamnn.run.console import doubtful_result
from streamnn.run.folder import BEST, LATEST, STEPS_CSV, RunDir
from streamnn.nn.functional import ACTIVATIONS
from streamnn.run.config import CHOICES, DEFAULTS, LATER_KEYS, RESUMABLE, check_shift_applies, resolve_config
from streamnn.run.modelkinds import applicable, check_applicable
from streamnn.run.stop import TrainingInterrupted
from streamnn.run.trainer import Trainer
from streamnn.cli.common import CONTEXT_SETTINGS, Command, cache_options, rank_fail, threads_option, user_errors

# configuration keys set by differently named options
_SOURCES = {"schedule_params": ("lr_decay", "lr_factor", "lr_every", "lr_min", "lr_param"),
            "optimizer_params": ("opt_param",)}


def _parse_hidden(value: str) -> list[int]:
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give layer sizes like 128,32") from None


def _parse_pairs(pairs: tuple[str, ...], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected NAME=VALUE", param_hint=option)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@cache_options
@click.command(cls=Command, context_settings=CONTEXT_SETTINGS)
@click.argument("store", required=False, type=click.Path(dir_okay=False))
@click.option("--model", type=click.Choice(CHOICES["model"]), default=DEFAULTS["model"], show_default=True,
              help="logistic: logistic regression; mlp: fully connected network; cnn: convolutional network.")
@click.option("--hidden", default=",".join(map(str, DEFAULTS["hidden"])), show_default=True,
              help="Hidden (dense) layer sizes of the mlp or of the cnn's head, comma separated ('' for none).")
@click.option("--conv", default=",".join(map(str, DEFAULTS["conv"])), show_default=True,
              help="cnn: channels of each block (conv kernel x kernel 'same' + ReLU + 2x2 max-pool), comma separated.")
@click.option("--kernel", type=int, default=DEFAULTS["kernel"], show_default=True,
              help="cnn: convolution kernel size (3 or 5; any odd size).")
@click.option("--batch-norm/--no-batch-norm", default=DEFAULTS["batch_norm"], show_default=True,
              help="cnn: batch normalization after every convolution.")
@click.option("--head", type=click.Choice(CHOICES["head"]), default=DEFAULTS["head"], show_default=True,
              help="cnn: flatten = the last block's pixels x channels feed the dense layers; gap = global average "
                   "pooling, each channel's mean (far fewer weights).")
@click.option("--activation", type=click.Choice(list(ACTIVATIONS)), default=DEFAULTS["activation"], show_default=True,
              help="Hidden-layer activation of the mlp (e.g. relu, tanh, sigmoid).")
@click.option("--optimizer", type=click.Choice(CHOICES["optimizer"]), default=DEFAULTS["optimizer"], show_default=True)
@click.option("--opt-param", multiple=True, metavar="NAME=VALUE",
              help="Optimizer parameter, repeatable: beta (momentum, rmsprop), beta1, beta2, eps, "
                   "bias_correction, weight_decay (decoupled, AdamW-style).")
@click.option("--lr", type=float, default=DEFAULTS["lr"], show_default=True, help="Initial learning rate.")
@click.option("--lr-schedule", type=click.Choice(CHOICES["lr_schedule"]), default=DEFAULTS["lr_schedule"], show_default=True,
              help="Learning rate as a function of the epoch (set at each epoch start).")
@click.option("--lr-decay", type=float, default=None,
              help="hyperbolic: lr = lr0 / (1 + decay * epoch)  [default: 1].")
@click.option("--lr-factor", type=float, default=None,
              help="step: lr0 * factor^floor(epoch/every) [0.1]; exponential: lr0 * factor^epoch [0.95].")
@click.option("--lr-every", type=float, default=None, help="step: epochs between drops [default: 10].")
@click.option("--lr-min", type=float, default=None, help="cosine: final learning rate [default: 0].")
@click.option("--lr-param", multiple=True, metavar="NAME=VALUE",
              help="Any schedule parameter, repeatable (e.g. total_epochs=30 for cosine).")
@click.option("--epochs", type=int, default=DEFAULTS["epochs"], show_default=True)
@click.option("--batch-size", type=int, default=DEFAULTS["batch_size"], show_default=True)
@click.option("--weight-decay", type=float, default=DEFAULTS["weight_decay"], show_default=True,
              help="L2 regularization strength.")
@click.option("--dropout", type=float, default=DEFAULTS["dropout"], show_default=True,
              help="Dropout rate of hidden dense layers (mlp, cnn).")
@click.option("--standardize/--no-standardize", default=DEFAULTS["standardize"], show_default=True,
              help="Standardize inputs with the store's per-pixel training mean/std.")
@click.option("--augment", default="none", show_default=True, metavar="SPEC",
              help="Training augmentation: none, or any of flip (random horizontal flips), shift (random "
                   "translations, see --shift) and erase[=P] (random erasing: with probability P, default 0.5, "
                   "a random rectangle of 2-33% of the image, aspect 0.3-3.3, set to 0 after standardization: "
                   "the mean image with --standardize, else black) joined by commas, e.g. flip,shift,erase=0.25.")
@click.option("--shift", type=int, default=DEFAULTS["shift"], show_default=True, metavar="N",
              help="Shift augmentation: translate by up to N pixels (each way, both axes).")
@click.option("--shift-padding", type=click.Choice(CHOICES["shift_padding"]), default=DEFAULTS["shift_padding"],
              show_default=True, help="Shift augmentation: how the uncovered border is filled.")
@click.option("--val-fraction", type=float, default=DEFAULTS["val_fraction"], show_default=True,
              help="Seeded, stratified part of the training split held out to select checkpoint-best.h5.")
@click.option("--dtype", type=click.Choice(CHOICES["dtype"]), default=DEFAULTS["dtype"], show_default=True)
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True)
@click.option("--eval-split", default="auto", show_default=True,
              help="Split evaluated after every epoch: 'auto' = test when the store has it; 'none' to skip.")
@click.option("--order", type=click.Choice(CHOICES["order"]), default=DEFAULTS["order"], show_default=True,
              help="Shuffle order: exact permutation, or contiguous blocks (faster on slow disks).")
@click.option("--reader", type=click.Choice(CHOICES["reader"]), default=DEFAULTS["reader"],
              show_default=True, help="How the store is read: mmap (memory map, fastest in the page cache), "
              "pread (positional reads from 16 threads: a store bigger than RAM), auto (pread when X is over "
              "half the available memory). May change on --resume.")
@threads_option("the CPUs this process may use less one for the loader (1 per rank under mpiexec); may "
                "change on --resume")
@click.option("--early-stop", type=int, default=DEFAULTS["early_stop"], show_default=True, metavar="N",
              help="Stop when the selection accuracy (validation, else --eval-split) has not improved for N "
                   "epochs (0: never). May change on --resume.")
@click.option("--ema", type=float, default=DEFAULTS["ema"], show_default=True, metavar="DECAY",
              help="Evaluate (and keep in checkpoint-best.h5) an exponential moving average of the weights, "
                   "average = DECAY * average + (1 - DECAY) * weights after every step, e.g. 0.999 (0: none).")
@click.option("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"], show_default=True,
              metavar="EPS", help="Train towards the targets Y (1 - EPS) + EPS / K (K classes; 2 for two), e.g. 0.1.")
@click.option("--checkpoint-every", type=int, default=DEFAULTS["checkpoint_every"], show_default=True,
              metavar="N", help="Also write checkpoint-latest.h5 every N steps (0: only at epoch ends).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: runs/<store name>].")
@click.option("--force", is_flag=True,
              help="Start a new run even if --out holds one, or other files: the earlier run's files "
                   "(recognised by content) are deleted, nothing else is touched.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its checkpoint-latest.h5, with its saved configuration.")
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: when stderr is a terminal].")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_context
def main(ctx: click.Context, store: str | None, out: str | None, force: bool, resume: bool, quiet: bool,
         progress: bool | None, **options: Any) -> None:
    """Train a model on STORE (made by streamnn-pack), writing into --out: checkpoint-latest.h5,
    checkpoint-best.h5, metrics.csv, steps.csv (loss of every step), curves.png, config.json.

    Ctrl-C or SIGTERM saves a checkpoint after the current step and exits with 130 / 143;
    `--resume` continues it exactly. When resuming, options given on the command line must
    match the saved configuration (only --epochs, --reader, --threads and --early-stop may change).

    `mpiexec -n K streamnn-train ...` trains data-parallel on K ranks (pip install
    'streamnn[mpi]'): the same run as one process, --batch-size being the global batch;
    rank 0 writes the outputs, and --resume works on any number of ranks.
    """
    explicit = {name for name in ctx.params
                if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    config = _config_from_options(options)
    given = {k: v for k, v in config.items() if explicit & set(_SOURCES.get(k, (k,)))}
    if out is None:
        if store is None:
            raise click.UsageError("give a STORE (or --out DIR with --resume)")
        out = str(Path("runs") / Path(store).stem)
    if force and resume:
        raise click.UsageError("--force and --resume exclude each other")
    if not resume and store is None:
        raise click.UsageError("missing argument STORE")
    with user_errors(ranks=True):
        comm = world()  # under mpiexec -n K: K ranks, rank 0 writes and speaks (streamnn.dist)
        try:
            if resume:
                trainer = agreed(comm, lambda: _resume(out, store, given, quiet or comm.rank > 0, progress, comm))
            else:
                agreed(comm, lambda: check_applicable(config["model"], given))
                agreed(comm, lambda: check_shift_applies(config["augment"], given))
                _agree_before_writing(comm, config, store, force)
                agreed(comm, lambda: _prepare_new(RunDir(out), force, comm.rank))
                new = applicable({**config, "store": store}, config["model"])
                trainer = agreed(comm, lambda: Trainer(new, out, verbose=not quiet, echo=click.echo,
                                                       progress=progress, comm=comm))
            history = trainer.fit()
        except TrainingInterrupted as exc:  # every rank stops at the same step
            if comm.rank == 0:
                click.echo(f"{exc}\nresume with: streamnn-train --resume --out {path_text(out)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:  # a second signal: no agreement, so under mpiexec this ends the job
            latest = Path(out) / LATEST
            rank_fail(f"interrupted: aborted without saving; {path_text(latest)} holds the last saved state"
                      if latest.is_file() else "interrupted before anything was saved", 130)
    if not quiet and comm.rank == 0:
        click.echo(_final_summary(trainer, history))
        for line in doubtful_result(trainer.config, history, _step_losses(Path(out) / STEPS_CSV)):
            click.echo(line, err=True)


def _agree_before_writing(comm: Comm, config: dict[str, Any], store: str, force: bool) -> None:
    """Under mpiexec, the ranks' options and store must agree before rank 0 touches --out (the
    trainer checks the resolved run again before its first step)."""
    if comm.size > 1:
        fingerprint = agreed(comm, lambda: _fingerprint(store))
        agree(comm, "training", {**config, "force": force, "store fingerprint": fingerprint})


def _fingerprint(store: str) -> str:
    with open_store(store) as s:
        return s.fingerprint


def _prepare_new(run: RunDir, force: bool, rank: int) -> None:
    """Rank 0 checks (and with ``force`` empties) the folder for a new run; other ranks leave it alone."""
    if rank == 0:
        with run.lock():  # not while another trainer uses the folder
            run.prepare_new(force)


def _config_from_options(options: dict[str, Any]) -> dict[str, Any]:
    cfg = {k: v for k, v in options.items() if k in DEFAULTS}
    cfg["hidden"] = _parse_hidden(options["hidden"])
    cfg["conv"] = _parse_hidden(options["conv"])
    cfg["augment"] = None if options["augment"] == "none" else options["augment"]
    schedule = _parse_pairs(options["lr_param"], "--lr-param")
    for option, key in (("lr_decay", "decay"), ("lr_factor", "factor"), ("lr_every", "every"), ("lr_min", "min_lr")):
        if options.get(option) is not None:
            schedule[key] = options[option]
    cfg["schedule_params"] = schedule
    cfg["optimizer_params"] = _parse_pairs(options["opt_param"], "--opt-param")
    return cfg


def _resume(out: str, store: str | None, given: dict[str, Any], quiet: bool, progress: bool | None,
            comm: Comm) -> Trainer:
    """Resume, refusing command-line options that contradict the saved configuration."""
    from streamnn.run.state import load_run_config

    run = RunDir(out)
    run.check_run_names()
    path = run / LATEST
    if not path.is_file():
        raise StreamnnError(f"nothing to resume: no {LATEST} here", path_text(out))
    saved = {**LATER_KEYS, **load_run_config(path)}  # keys newer than the run: what runs without them did
    check_applicable(given.get("model", saved.get("model", DEFAULTS["model"])), given)
    check_shift_applies(given.get("augment", saved.get("augment")), given)
    if not isinstance(saved.get("store"), str):
        raise StreamnnError("checkpoint configuration names no store path", path_text(path))
    if store is None and not Path(saved["store"]).is_file():
        raise StreamnnError(f"the run's store {path_text(saved['store'])} is not there (moved?): give its new "
                            f"path: streamnn-train NEWPATH --resume --out {path_text(out)}")
    with open_store(store or saved["store"]) as s:
        wanted = resolve_config({**saved, **given, "store": saved["store"]}, s)
    conflicts = [k for k in given if wanted.get(k) != saved.get(k) and k not in RESUMABLE]
    if conflicts:
        names = {"schedule_params": "the schedule parameters", "optimizer_params": "--opt-param"}
        listing = ", ".join(f"{names.get(k, '--' + k.replace('_', '-'))} {given[k]!r} (saved: {saved.get(k)!r})"
                            for k in conflicts)
        raise StreamnnError(f"cannot change {listing} when resuming; drop these options or start a new --out")
    changes = {k: wanted[k] for k in RESUMABLE if k in given and wanted[k] != saved.get(k)}
    if changes and not quiet:
        click.echo(f"resuming with {', '.join(f'{k} {saved.get(k)} -> {v}' for k, v in changes.items())}")
    return Trainer.resume(out, store=store, changes=changes, verbose=not quiet, echo=click.echo, progress=progress,
                          comm=comm)


def _step_losses(path: Path) -> list[float]:
    """The loss of every step in ``steps.csv`` (``step,epoch,loss``); nothing when it cannot be read."""
    losses = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            next(f, None)
            for line in f:
                losses.append(float(line.rsplit(",", 1)[-1]))
    except (OSError, ValueError):
        return []
    return losses


def _final_summary(trainer: Trainer, history: dict[str, list[float]]) -> str:
    cfg, sel = trainer.config, trainer.selection
    if not history["epoch"]:
        return f"outputs in {path_text(trainer.out)}"
    i = trainer.best_epoch - 1
    name = {"val": "validation", "eval": cfg["eval_split"], "train": "train"}[sel]
    text = f"{BEST}: epoch {trainer.best_epoch}, {name} accuracy {trainer.best:.4f}"
    if sel == "val" and cfg["eval_split"] and i >= 0 and not math.isnan(history["eval_accuracy"][i]):
        text += f", {cfg['eval_split']} accuracy {history['eval_accuracy'][i]:.4f} (not used for selection)"
    return text + f"\noutputs in {path_text(trainer.out)}"


if __name__ == "__main__":  # pragma: no cover
    main()
