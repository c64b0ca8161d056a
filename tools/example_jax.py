"""Train a small model with jax.numpy on the CPU from a store, through streamnn.grain.HostBatches.

    pip install -e '.[bench]'                  # or: pip install jax (a CPU build)
    python tools/example_jax.py demo.h5        # a store made by streamnn-pack
    python tools/example_jax.py demo.h5 --epochs 3 --batch 64 --hidden 64

The code between the markers below is the JAX example of docs/frameworks.md, run as it is shown
there. It trains a one-hidden-layer network (softmax cross-entropy, plain SGD, one jitted step)
for --epochs epochs, stops once mid-epoch to checkpoint the stream with ``get_state()``, resumes
it in a new HostBatches with ``set_state()``, and checks that the resumed stream delivers exactly
the batches the uninterrupted one would have. It prints the loss and accuracy of each epoch and
the training samples/s (with the load average). Not run by the test suite: importing JAX and
compiling the step take seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--split", default="train")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    a = ap.parse_args()
    store, split, epochs, batch_size, hidden, lr = a.store, a.split, a.epochs, a.batch, a.hidden, a.lr
    marks = [time.perf_counter()]
    # -- example: start --
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from streamnn.grain import HostBatches

    batches = HostBatches(store, split, batch_size, seed=0, augment="flip", standardize=True,
                          process_index=jax.process_index(), process_count=jax.process_count())
    sharding = NamedSharding(Mesh(jax.devices(), ("batch",)), P("batch"))
    h, w, c = batches.loader.image_shape
    n_in, n_classes = h * w * c, len(batches.loader.class_names)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"W1": jax.random.normal(k1, (n_in, hidden)) * jnp.sqrt(2 / n_in), "b1": jnp.zeros(hidden),
              "W2": jax.random.normal(k2, (hidden, n_classes)) * jnp.sqrt(1 / hidden), "b2": jnp.zeros(n_classes)}

    def forward(p, image):
        x = image.reshape(len(image), -1)
        return jax.nn.relu(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    @jax.jit
    def step(p, image, label, mask):
        def loss(p):
            logits = forward(p, image)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], 1)[:, 0]
            return (nll * mask).sum() / mask.sum(), ((logits.argmax(1) == label) * mask).sum()
        (value, correct), grads = jax.value_and_grad(loss, has_aux=True)(p)
        return jax.tree.map(lambda q, g: q - lr * g, p, grads), value, correct

    def on_devices(batch):  # each process's rows -> one global array (fixed shape: compiled once)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

    for epoch in range(epochs):
        total, correct, seen = 0.0, 0, 0
        for batch in batches:
            b = on_devices(batch)
            params, value, right = step(params, b["image"], b["label"], b["mask"])
            n = int(batch["mask"].sum())
            total, correct, seen = total + float(value) * n, correct + int(right), seen + n
        print(f"epoch {epoch}: loss {total / seen:.4f}, accuracy {correct / seen:.3f}")
        marks.append(time.perf_counter())  # (not in the docs' example)

    # A checkpoint mid-epoch: the stream's state is a dict of str and int (JSON-able).
    walk = iter(batches)
    for _ in range(min(3, len(batches) - 1)):
        next(walk)
    state = batches.get_state()
    resumed = HostBatches(store, split, batch_size, seed=0, augment="flip", standardize=True)
    resumed.set_state(state)  # also with another process_count
    # -- example: end --
    rest = [b["image"] for b in walk]
    again = [b["image"] for b in resumed]
    same = len(rest) == len(again) and all(np.array_equal(x, y) for x, y in zip(rest, again))
    print(f"resumed mid-epoch: {'the same batches' if same else 'OTHER BATCHES'} ({len(again)} of {len(batches)})")
    later = (epochs - 1) * batches.loader.n_rows / (marks[-1] - marks[1]) if epochs > 1 else float("nan")
    print(f"first epoch (with JAX's start and compilation) {marks[1] - marks[0]:.1f} s; then {later:.0f} "
          f"training samples/s; load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
