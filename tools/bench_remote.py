"""Benchmark streaming a store over HTTP or S3 against the link's own limit (docs/remote.md).

    python tools/bench_remote.py                       # 200,000 rows of 64x64x3 uint8 (2.5 GB)
    python tools/bench_remote.py --rows 50000 --dtypes uint8,float32
    python tools/bench_remote.py --rows 20000 --delay-ms 60     # every answer 60 ms late (see below)
    python tools/bench_remote.py --rows 20000 --delay-ms 60 --first-batch 5 --no-epoch
    python tools/bench_remote.py --rows 20000 --delay-ms 60 --s3 --cache \\
        --mosaic-python .venv-mosaic/bin/python        # MosaicML Streaming, side by side

Writes a store of random pixels (per dtype) into a temporary folder served by nginx on
127.0.0.1 (started here, with its own config; `apt-get install nginx`), then measures, each in a
fresh subprocess (so peak RSS is that run's own):

  loader   one shuffled epoch (exact order, batch 256, prefetch 2) of Loader(URL): samples/s,
           seconds to the first batch, bytes transferred / bytes of the rows, requests, peak RSS
  link     the link's limit in the same run: parallel ranged GETs of one row each (the sizes the
           shuffled epoch asks for) at random rows, with the same concurrency
           (STREAMNN_REMOTE_THREADS, default 32), read into a reused buffer: rows/s
  first    (``--first-batch N``) seconds from making the Loader to its first batch, in N fresh
           processes (median; the Python start and imports are not counted)
  cache    (``--cache``) two epochs with a fresh local cache (--cache): the first epoch, the
           second, and the requests the second made
  mosaic   (``--mosaic-python PY``, with ``--s3``) MosaicML Streaming on the same rows: MDS
           shards (uncompressed) written by PY, read by ``StreamingDataset`` (shuffled) from the
           same server through its S3 client: seconds to the first batch and to the end of the
           epoch, ours over theirs. PY is an interpreter with ``mosaicml-streaming`` (it pins
           NumPy < 2.2: keep it apart, e.g. ``python -m venv .venv-mosaic && .venv-mosaic/bin/pip
           install 'torch==2.13.0' mosaicml-streaming``)

Everything runs on loopback: the server shares the machine's cores with the reader (the link
limit is measured under the same handicap). ``--delay-ms R`` serves with a small Python server
(a thread per connection) that waits R ms before every answer: a stand-in for an R ms round
trip (``tc netem`` needs the kernel's netem queueing discipline, which not every kernel has).
It answers several ranges in one request as nginx does, or with ``--single-range`` as a server
that sends the whole file instead; with ``--s3`` it also serves as an S3 endpoint (path-style,
no authentication: ``s3://bench/NAME``), for our S3 reader and MosaicML's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPE = (64, 64, 3)
BATCH = 256
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


def make(path: Path, rows: int, dtype: str) -> None:
    from streamnn import StoreWriter
    rng = np.random.default_rng(0)
    with StoreWriter(path, class_names=["a", "b"], image_shape=SHAPE, dtype=dtype) as w:
        w.add_split("train", rows)
        for i in range(0, rows, 2000):
            n = min(2000, rows - i)
            w.write_rows("train", rng.integers(0, 256, (n, *SHAPE), dtype=np.uint8), np.arange(i, i + n) % 2,
                         [f"r/{j}" for j in range(i, i + n)])
        w.commit()


def child_loader(url: str, cache: str = "") -> dict:
    """One shuffled epoch (two with a cache: the second's time and requests too)."""
    from streamnn.data.loader import Loader
    from streamnn.data.remote import set_cache
    from streamnn.data.remote.objects import RemoteObject
    if cache:
        set_cache(cache, "100G")
    start = time.perf_counter()
    with Loader(url, "train", batch_size=BATCH, seed=1, order="exact", prefetch=2) as L:
        first, n = None, 0
        for X, _ in L:
            if first is None:
                first = time.perf_counter() - start
            n += X.shape[1]
        total = time.perf_counter() - start
        needed = n * L.n_features * np.dtype(L._maker.reader.dtype).itemsize
        obj = L._maker.reader.obj
        out = {"samples_s": n / (total - first + 1e-9) if n > BATCH else n / total, "first_batch_s": first,
               "epoch_s": total, "rows": n, "bytes": obj.bytes_read, "needed": needed, "requests": obj.requests,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if cache:
            obj.cache.settle(600)
            before, start = obj.requests, time.perf_counter()
            for X, _ in L:
                pass
            out.update(epoch2_s=time.perf_counter() - start, epoch2_requests=obj.requests - before)
    return out


def child_first(url: str) -> dict:
    from streamnn.data.loader import Loader
    start = time.perf_counter()
    with Loader(url, "train", batch_size=BATCH, seed=1, order="exact", prefetch=2) as L:
        next(iter(L))
        return {"first_batch_s": time.perf_counter() - start}


def child_link(url: str, rows: int, count: int) -> dict:
    import urllib3
    from streamnn import open_store
    from streamnn.data.remote.objects import Policy
    with open_store(url) as s:
        dset = s.dataset("train")
        offset, row_bytes = dset.id.get_offset(), dset.shape[1] * dset.dtype.itemsize
    threads = Policy.from_env().threads
    pool = urllib3.PoolManager(maxsize=threads, retries=False)
    picks = np.random.default_rng(2).permutation(rows)[:count].tolist()
    local = threading.local()

    def get(r: int) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = memoryview(bytearray(row_bytes))
        a = offset + r * row_bytes
        resp = pool.request("GET", url, headers={"Range": f"bytes={a}-{a + row_bytes - 1}"}, preload_content=False)
        have = 0
        while have < row_bytes:
            have += resp.readinto(buf[have:])
        resp.release_conn()
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(get, picks, chunksize=64))
    return {"rows_s": count / (time.perf_counter() - start), "threads": threads}


def mosaic_importable() -> None:
    """``import streaming`` imports its vision datasets, hence torchvision, which the CPU build of
    torch may not load (PyPI's torchvision is built for CUDA): the two names they import are
    stubbed then (the datasets measured here do not use them)."""
    import types
    try:
        import torchvision  # noqa: F401
    except Exception:
        import importlib.machinery
        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules["torchvision.datasets"].VisionDataset = object  # type: ignore[attr-defined]
        sys.modules["torchvision.transforms.functional"].to_tensor = None  # type: ignore[attr-defined]


def child_mosaic_write(x_npy: str, y_npy: str, out: str) -> dict:
    """MDS shards of the rows (in the MosaicML interpreter)."""
    mosaic_importable()
    from streaming import MDSWriter
    X, Y = np.load(x_npy, mmap_mode="r"), np.load(y_npy)
    with MDSWriter(out=out, columns={"x": "ndarray:uint8", "y": "int"}, compression=None) as w:
        for i in range(len(X)):
            w.write({"x": np.asarray(X[i]), "y": int(Y[i])})
    return {"shards": len([p for p in os.listdir(out) if p.endswith(".mds")])}


def child_mosaic(remote: str, local: str) -> dict:
    """One shuffled epoch of StreamingDataset over ``remote`` (s3://), batches of BATCH."""
    mosaic_importable()
    from streaming import StreamingDataset
    from torch.utils.data import DataLoader
    start = time.perf_counter()
    ds = StreamingDataset(remote=remote, local=local, shuffle=True, shuffle_seed=1, batch_size=BATCH)
    first, n = None, 0
    for batch in DataLoader(ds, batch_size=BATCH, num_workers=0):
        if first is None:
            first = time.perf_counter() - start
        n += len(batch["y"])
    total = time.perf_counter() - start
    return {"first_batch_s": first, "epoch_s": total, "rows": n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def serve_delayed(root: str, port: int, delay_ms: float, multi: bool) -> None:
    """A ranged-GET file server that waits ``delay_ms`` before each answer (a round trip of that
    length), one thread per connection; several ranges in one request are answered as nginx
    does (``multi``), or with the whole file (200) as a server without it does. Also an S3
    endpoint for GetObject and HeadObject (path-style ``/BUCKET/KEY`` = ``root/BUCKET/KEY``)."""
    import http.server
    sys.path.insert(0, str(HERE.parent / "tests"))
    from servers import answer_ranges

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body leave at once, not 40 ms apart (delayed ACK)

        def log_message(self, *args: object) -> None:
            pass

        def _file(self) -> tuple[Path, str] | None:
            time.sleep(delay_ms / 1000)
            path = Path(root) / self.path.split("?")[0].lstrip("/")
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            st = path.stat()
            return path, f'"{st.st_mtime_ns:x}-{st.st_size:x}"'

        def do_HEAD(self) -> None:
            found = self._file()
            if found:
                self.send_response(200)
                self.send_header("ETag", found[1])
                self.send_header("Content-Length", str(found[0].stat().st_size))
                self.end_headers()

        def do_GET(self) -> None:
            found = self._file()
            if found:
                try:
                    for piece in answer_ranges(self, str(found[0]), found[1], multi):
                        self.wfile.write(piece)
                except OSError:  # a whole file not wanted: the client closed the connection
                    self.close_connection = True

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 1024  # connections opened at once (STREAMNN_REMOTE_THREADS=64+) are not dropped

    server = Server(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def run_child(*args: str, python: str = sys.executable, env: dict | None = None) -> dict:
    out = subprocess.run([python, __file__, "--child", *args], check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Delayed:
    """The delayed server in a process of its own."""

    def __init__(self, root: Path, delay_ms: float, multi: bool) -> None:
        from servers import free_port, wait_port
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", "serve", str(root), str(self.port),
                                      str(delay_ms), str(int(multi))])
        wait_port(self.port, self.proc, "the delayed server", root / "none")

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        from servers import stop
        stop(self.proc)


def mosaic(a: argparse.Namespace, path: Path, root: Path, env: dict, ours: dict, tmp: Path) -> None:
    """MDS shards of the store's rows, one shuffled epoch of each reader, side by side."""
    import h5py
    with h5py.File(path, "r") as f:
        np.save(tmp / "x.npy", f["train/X"][...])
        np.save(tmp / "y.npy", f["train/y"][...])
    run_child("mosaic-write", str(tmp / "x.npy"), str(tmp / "y.npy"), str(root / "bench" / "mds"), python=a.mosaic_python)
    theirs = run_child("mosaic", "s3://bench/mds", str(tmp / "mosaic-local"), python=a.mosaic_python,
                       env={**env, "S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]})
    print(f"| MosaicML Streaming | {theirs['first_batch_s']:.2f} s | {theirs['epoch_s']:.1f} s | "
          f"{theirs['peak_rss_mb']:.0f} MB |")
    for name, got in ours.items():
        print(f"| {name} / MosaicML | {got['first_batch_s'] / theirs['first_batch_s']:.2f} | "
              f"{got['epoch_s'] / theirs['epoch_s']:.2f} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dtypes", default="uint8")
    p.add_argument("--link-rows", type=int, default=50_000, help="ranged GETs of the link measurement")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="serve with a Python server adding this delay to every answer instead of nginx")
    p.add_argument("--single-range", action="store_true", help="the delayed server answers one range a request")
    p.add_argument("--s3", action="store_true", help="read through the delayed server as an S3 endpoint")
    p.add_argument("--first-batch", type=int, default=0, metavar="N", help="time to the first batch, N processes")
    p.add_argument("--no-epoch", action="store_true", help="skip the epoch and link measurements")
    p.add_argument("--cache", action="store_true", help="also two epochs with a local cache")
    p.add_argument("--mosaic-python", default=None, help="an interpreter with mosaicml-streaming (needs --s3)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, arg, *rest = a.child
        if kind == "serve":
            serve_delayed(arg, int(rest[0]), float(rest[1]), rest[2] == "1")
            return
        work = {"loader": child_loader, "first": child_first, "link": lambda u, *r: child_link(u, *map(int, r)),
                "mosaic-write": child_mosaic_write, "mosaic": child_mosaic}[kind]
        print(json.dumps(work(arg, *rest)))
        return
    if (a.s3 or a.mosaic_python) and not a.delay_ms:
        p.error("--s3 and --mosaic-python need the delayed server (--delay-ms, 0.01 for none)")
    if a.mosaic_python and not a.s3:
        p.error("--mosaic-python reads through S3: add --s3")
    sys.path.insert(0, str(HERE.parent / "tests"))
    from servers import Nginx
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        root, work = Path(tmp) / "www", Path(tmp) / "nginx"
        (root / "bench").mkdir(parents=True)
        server = Delayed(root, a.delay_ms, not a.single_range) if a.delay_ms else Nginx(root, work)
        env = dict(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{server.port}") if a.s3 else {}
        try:
            print(f"server: {'Python, +%g ms per answer' % a.delay_ms if a.delay_ms else 'nginx'}"
                  f"{', one range a request' if a.single_range else ''}{', as S3' if a.s3 else ''}")
            for dtype in a.dtypes.split(","):
                path = root / "bench" / f"{dtype}.h5"
                make(path, a.rows, dtype)
                url = f"s3://bench/{path.name}" if a.s3 else server.url(f"bench/{path.name}")
                print(f"\n{dtype}, {a.rows:,} rows, {path.stat().st_size / 1e9:.2f} GB: {url}")
                if a.first_batch:
                    times = [run_child("first", url, env=env)["first_batch_s"] for _ in range(a.first_batch)]
                    print(f"first batch: median {statistics.median(times):.2f} s of {len(times)} "
                          f"({', '.join(f'{t:.2f}' for t in times)})")
                if a.no_epoch:
                    continue
                ours = {"streamnn": run_child("loader", url, env=env)}
                if a.cache:
                    ours["streamnn --cache"] = run_child("loader", url, str(Path(tmp) / f"cache-{dtype}"), env=env)
                link = None if a.s3 else run_child("link", url, str(a.rows), str(min(a.link_rows, a.rows)))
                print("| reader | samples/s | link rows/s | ratio | first batch | epoch | bytes moved / needed | "
                      "requests | peak RSS | second epoch |")
                print("|---|---|---|---|---|---|---|---|---|---|")
                for name, got in ours.items():
                    second = (f"{got['epoch2_s']:.1f} s, {got['epoch2_requests']} requests" if "epoch2_s" in got else "")
                    print(f"| {name} | {got['samples_s']:,.0f} | {link['rows_s']:,.0f} | "
                          f"{got['samples_s'] / link['rows_s']:.2f} | " if link else f"| {name} | {got['samples_s']:,.0f} | | | ",
                          end="")
                    print(f"{got['first_batch_s']:.2f} s | {got['epoch_s']:.1f} s | {got['bytes'] / got['needed']:.3f} | "
                          f"{got['requests']:,} | {got['peak_rss_mb']:.0f} MB | {second} |", flush=True)
                if a.mosaic_python:
                    print("| reader | first batch | epoch | peak RSS |\n|---|---|---|---|")
                    mosaic(a, path, root, env, ours, Path(tmp))
                path.unlink()
        finally:
            server.close()
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
