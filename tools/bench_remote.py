"""Benchmark streaming a store over HTTP against the link's own limit (docs/remote.md).

    python tools/bench_remote.py                       # 200,000 rows of 64x64x3 uint8 (2.5 GB)
    python tools/bench_remote.py --rows 50000 --dtypes uint8,float32
    python tools/bench_remote.py --rows 20000 --delay-ms 60     # every answer 60 ms late (see below)

Writes a store of random pixels (per dtype) into a temporary folder served by nginx on
127.0.0.1 (started here, with its own config; `apt-get install nginx`), then measures, each in a
fresh subprocess (so peak RSS is that run's own):

  loader   one shuffled epoch (exact order, batch 256, prefetch 2) of Loader(URL): samples/s,
           seconds to the first batch, bytes transferred / bytes of the rows, requests, peak RSS
  link     the link's limit in the same run: parallel ranged GETs of one row each (the sizes the
           shuffled epoch asks for) at random rows, with the same concurrency
           (STREAMNN_REMOTE_THREADS, default 32), read into a reused buffer: rows/s

The ratio loader/link is the figure to watch. Everything runs on loopback: the server shares the
machine's cores with the reader (the link limit is measured under the same handicap).
``--delay-ms R`` serves with a small Python server (a thread per connection) that waits R ms
before every answer: a stand-in for an R ms round trip where ``tc netem`` is unavailable.
"""
from __future__ import annotations

import argparse
import json
import resource
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


def child_loader(url: str) -> dict:
    from streamnn.data.loader import Loader
    from streamnn.data.remote.objects import RemoteObject
    moved = [0, 0]
    lock = threading.Lock()
    real = RemoteObject.read_into

    def counted(self, offset, bufs):  # every ranged GET: the metadata's and the rows'
        real(self, offset, bufs)
        with lock:
            moved[0] += sum(memoryview(b).nbytes for b in bufs)
            moved[1] += 1
    RemoteObject.read_into = counted
    start = time.perf_counter()
    with Loader(url, "train", batch_size=256, seed=1, order="exact", prefetch=2) as L:
        first, n = None, 0
        for X, _ in L:
            if first is None:
                first = time.perf_counter() - start
            n += X.shape[1]
        total = time.perf_counter() - start
        needed = n * L.n_features * np.dtype(L_dtype(L)).itemsize
    return {"samples_s": n / (total - first + 1e-9) if n > 256 else n / total, "first_batch_s": first,
            "epoch_s": total, "rows": n, "bytes": moved[0], "needed": needed, "requests": moved[1],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def L_dtype(loader) -> str:
    from streamnn import open_store
    with open_store(loader.path) as s:
        return s.dtype


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


def serve_delayed(root: str, port: int, delay_ms: float, multi: bool) -> None:
    """A ranged-GET file server that waits ``delay_ms`` before each answer (a round trip of that
    length; ``tc netem`` is not available in every kernel), one thread per connection; several
    ranges in one request are answered as nginx does (``multi``), or with the whole file (200)
    as a server without it does."""
    import http.server
    from servers import answer_ranges

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            time.sleep(delay_ms / 1000)
            path = Path(root) / self.path.lstrip("/")
            st = path.stat()
            body = answer_ranges(self, str(path), f'"{st.st_mtime_ns:x}-{st.st_size:x}"', multi)
            try:
                self.wfile.write(body)
            except OSError:  # a whole file not wanted: the client closed the connection
                self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dtypes", default="uint8")
    p.add_argument("--link-rows", type=int, default=50_000, help="ranged GETs of the link measurement")
    p.add_argument("--delay-ms", type=float, default=0.0,
                   help="serve with a Python server adding this delay to every answer instead of nginx")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, url, *rest = a.child
        if kind == "serve":
            serve_delayed(url, int(rest[0]), float(rest[1]))
            return
        print(json.dumps(child_loader(url) if kind == "loader" else child_link(url, *map(int, rest))))
        return
    sys.path.insert(0, str(HERE.parent / "tests"))
    from servers import Nginx
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        root, work = Path(tmp) / "www", Path(tmp) / "nginx"
        root.mkdir()
        if a.delay_ms:
            from servers import free_port, stop, wait_port

            class Delayed:
                def __init__(self) -> None:
                    self.port = free_port()
                    self.proc = subprocess.Popen([sys.executable, __file__, "--child", "serve", str(root),
                                                  str(self.port), str(a.delay_ms)])
                    wait_port(self.port, self.proc, "the delayed server", work / "none")

                def url(self, name: str) -> str:
                    return f"http://127.0.0.1:{self.port}/{name}"

                def close(self) -> None:
                    stop(self.proc)
            server = Delayed()
        else:
            server = Nginx(root, work)
        try:
            print(f"server: {'Python, +%g ms per answer' % a.delay_ms if a.delay_ms else 'nginx'}")
            print("| dtype | rows | store | loader samples/s | link rows/s | ratio | first batch | bytes moved / needed | requests | peak RSS |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for dtype in a.dtypes.split(","):
                path = root / f"{dtype}.h5"
                make(path, a.rows, dtype)
                url = server.url(path.name)
                link = run_child("link", url, str(a.rows), str(min(a.link_rows, a.rows)))
                got = run_child("loader", url)
                print(f"| {dtype} | {a.rows:,} | {path.stat().st_size / 1e9:.2f} GB | {got['samples_s']:,.0f} | "
                      f"{link['rows_s']:,.0f} | {got['samples_s'] / link['rows_s']:.2f} | {got['first_batch_s']:.2f} s | "
                      f"{got['bytes'] / got['needed']:.3f} | {got['requests']:,} | {got['peak_rss_mb']:.0f} MB |",
                      flush=True)
                path.unlink()
        finally:
            server.close()


if __name__ == "__main__":
    main()
