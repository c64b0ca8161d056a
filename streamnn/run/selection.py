"""Model selection: the validation rows held out of training, the accuracy that picks
checkpoint-best.h5, and early stopping on it."""
from __future__ import annotations

from typing import Any

import numpy as np

from streamnn.errors import StreamnnError
from streamnn.run.config import derive_seed


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of row indices into (train, val), each sorted."""
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "split")))
    val = []
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        n_val = int(round(fraction * len(rows)))
        val.append(rng.permutation(rows)[:n_val])
    val_rows = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise StreamnnError(f"val-fraction {fraction} leaves {len(train_rows)} training and {len(val_rows)} "
                            "validation rows")
    return train_rows.astype(np.int64), val_rows.astype(np.int64)


def early_stopped(trainer: Any) -> bool:
    """Whether ``early_stop`` epochs have passed since a trainer's best selection accuracy (and say so)."""
    cfg, epoch, best_epoch, say = trainer.config, trainer.epoch, trainer.best_epoch, trainer.say
    n = cfg.get("early_stop", 0)
    if not n or epoch - best_epoch < n or epoch >= cfg["epochs"]:
        return False
    say(f"early stop: no better {selection_split(cfg)} accuracy in the {epoch - best_epoch} epochs since epoch "
        f"{best_epoch} (--early-stop {n}); resume with a larger --early-stop to train on")
    return True


def selection_split(cfg: dict[str, Any]) -> str:
    """Which accuracy selects checkpoint-best.h5: "val", "eval" or "train"."""
    return "val" if cfg["val_fraction"] > 0 else "eval" if cfg["eval_split"] else "train"
