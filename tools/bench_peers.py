"""streamnn against other data loaders on the same rows: conversion, shuffled epochs warm and cold,
memory, bytes read, shuffle quality and mid-epoch resume, in one run.

    python tools/bench_peers.py PHOTOS --work DIR                 # 200,000 rows (several GB in DIR)
    python tools/bench_peers.py PHOTOS --work DIR --rows 20000 --repeats 2

PHOTOS: a folder of JPEG photos in class folders (at any depth; the class: the photo's folder). Every photo
is decoded once and resized to 64x64 (OpenCV, BGR uint8); row i of the benchmark is photo
i % n with i written into its first pixel (3 bytes), so that every loader's output says which
rows it delivered. Each contender converts the rows into its format under DIR (timed, rows/s),
then delivers shuffled epochs of batches of --batch rows as PyTorch-style float32 NCHW RGB
arrays in [0, 1] with --workers worker processes:

  streamnn-torch  StoreBatches(...).dataloader(num_workers=W): the store, exact seeded shuffle
  streamnn-numpy  streamnn's Loader, in the process (no workers; X is (D, B) BGR)
  mds             MosaicML Streaming: MDSWriter shards, StreamingDataset + StreamingDataLoader
  webdataset      tar shards, shard shuffle + a 1,000-sample buffer, WebLoader
  litdata         litdata.optimize chunks, StreamingDataset + StreamingDataLoader
  grain           ArrayRecord file, grain.DataLoader with an IndexSampler (global shuffle)
  h5py            torch DataLoader(shuffle=True) over an h5py dataset read row by row
  jpeg            torch DataLoader(shuffle=True) over the JPEG files, decoded and resized per
                  sample (the first --jpeg-samples samples of the epoch only: it is slow)

Each epoch runs in a fresh process, watched from here: samples/s in the page cache (median of
--repeats rounds, the contenders interleaved in each round; the epoch's time counts from the
first request, so it includes the start of the workers, also shown alone: the first batch's
wait) and from a cold cache (the contender's files dropped from the page cache with
posix_fadvise DONTNEED first), peak memory (the process tree's proportional set size, PSS, so
shared pages count once; in brackets without the pages of mapped files: a memory-mapped store's
pages and the libraries' code are the page cache's, shared and reclaimable), the data read from storage in the cold epoch (the pages of the
contender's files in the page cache after it, by mincore), shuffle quality (every row exactly once,
and the mean distance between consecutive rows / rows: 1/3 for a uniform shuffle, 0 for
stored order), and whether a checkpoint after 10 batches resumes with exactly the remaining
samples (on a copy of --resume-rows rows). Prints a Markdown table and the load average.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

NAMES = ("streamnn-torch", "streamnn-numpy", "mds", "webdataset", "litdata", "grain", "h5py", "jpeg")
SIZE = 64
SHUFFLE = {"streamnn-torch": "exact", "streamnn-numpy": "exact", "mds": "blocks (py1e)",
           "webdataset": "shards + buffer", "litdata": "chunks", "grain": "exact", "h5py": "exact",
           "jpeg": "exact"}


# -- the rows ----------------------------------------------------------------------------------------
def decode_photos(folder: str) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    import cv2
    found = sorted(glob.glob(os.path.join(folder, "**", "*.jpg"), recursive=True))
    classes = sorted({os.path.basename(os.path.dirname(f)) for f in found})
    files = [(f, classes.index(os.path.basename(os.path.dirname(f)))) for f in found]
    t = time.perf_counter()
    images = np.stack([cv2.resize(cv2.imread(f), (SIZE, SIZE), interpolation=cv2.INTER_AREA) for f, _ in files])
    return images, np.array([c for _, c in files], np.int64), [f for f, _ in files], len(files) / (time.perf_counter() - t)


def stamp(images: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Write each row number into its image's first pixel (in place)."""
    images[:, 0, 0, 0], images[:, 0, 0, 1], images[:, 0, 0, 2] = ids & 255, (ids >> 8) & 255, (ids >> 16) & 255
    return images


class Rows:
    """Row i = photo i % n, stamped with i (made in chunks: the rows need not fit in memory)."""

    def __init__(self, work: str) -> None:
        self.photos = np.load(os.path.join(work, "photos.npy"))
        self.labels = np.load(os.path.join(work, "labels.npy"))

    def chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.arange(start, stop)
        return stamp(self.photos[ids % len(self.photos)], ids), self.labels[ids % len(self.photos)]


def ids_nchw_rgb(x: Any) -> np.ndarray:
    p = np.rint(np.asarray(x)[:, :, 0, 0] * 255).astype(np.int64)
    return p[:, 2] + 256 * p[:, 1] + 65536 * p[:, 0]


def to_chw(img: np.ndarray) -> np.ndarray:
    """A stored (H, W, C) BGR uint8 image as the float32 (C, H, W) RGB array in [0, 1] a model takes."""
    return np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1), np.float32) * np.float32(1 / 255)


def no_torchvision() -> None:
    """MDS and LitData import torchvision, whose PyPI wheel is a CUDA build that does not load next to
    the CPU torch: stand in an empty module for the parts they import but these runs never use."""
    import importlib.abc
    import importlib.machinery
    import types
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]

    class Stub(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec: Any) -> Any:
            m = Stub(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module: Any) -> None:
            pass
    sys.meta_path.insert(0, Finder())


# -- conversions -------------------------------------------------------------------------------------
def convert(name: str, work: str, rows: int, out: str) -> None:
    src = Rows(work)
    chunks = [(i, min(i + 2000, rows)) for i in range(0, rows, 2000)]
    if name == "streamnn":
        from streamnn import StoreWriter
        with StoreWriter(out, class_names=["cats", "dogs"], image_shape=(SIZE, SIZE, 3), dtype="uint8") as w:
            w.add_split("train", rows)
            for a, b in chunks:
                x, y = src.chunk(a, b)
                w.write_rows("train", x, y, [str(i) for i in range(a, b)])
            w.commit()
    elif name == "h5py":
        import h5py
        with h5py.File(out, "w") as f:
            X = f.create_dataset("X", (rows, SIZE, SIZE, 3), np.uint8)
            Y = f.create_dataset("y", (rows,), np.int64)
            for a, b in chunks:
                X[a:b], Y[a:b] = src.chunk(a, b)
    elif name == "mds":
        no_torchvision()
        from streaming import MDSWriter
        with MDSWriter(out=out, columns={"image": "bytes", "label": "int"}, size_limit=1 << 26) as w:
            for a, b in chunks:
                x, y = src.chunk(a, b)
                for img, label in zip(x, y):
                    w.write({"image": img.tobytes(), "label": int(label)})
    elif name == "webdataset":
        import webdataset as wds
        os.makedirs(out)
        with wds.ShardWriter(os.path.join(out, "shard-%05d.tar"), maxcount=max(100, -(-rows // 16)),
                             verbose=0) as w:
            for a, b in chunks:
                x, y = src.chunk(a, b)
                for i, (img, label) in enumerate(zip(x, y), a):
                    w.write({"__key__": f"{i:08d}", "img": img.tobytes(), "cls": str(int(label)).encode()})
    elif name == "litdata":
        no_torchvision()
        import litdata
        litdata.optimize(fn=_lit_row, inputs=[(work, i) for i in range(rows)], output_dir=out, chunk_bytes="64MB",
                         num_workers=1, verbose=False, reorder_files=False)
    elif name == "grain":
        from array_record.python.array_record_module import ArrayRecordWriter
        w = ArrayRecordWriter(out, "group_size:1")
        for a, b in chunks:
            x, y = src.chunk(a, b)
            for img, label in zip(x, y):
                w.write(bytes([int(label)]) + img.tobytes())
        w.close()


_SOURCES: dict[str, Rows] = {}


def _lit_row(item: tuple[str, int]) -> dict[str, Any]:
    """LitData's conversion function (its workers are new processes: each loads the photos once)."""
    work, i = item
    src = _SOURCES.get(work) or _SOURCES.setdefault(work, Rows(work))
    x, y = src.chunk(i, i + 1)
    return {"image": x[0], "label": int(y[0])}


# -- the contenders, in a child process ------------------------------------------------------------------
def loader(name: str, work: str, size: str, workers: int, batch: int) -> tuple[Any, Any]:
    """(an iterable of batches, a function batch -> row ids) of one contender."""
    base = os.path.join(work, size)
    if name == "streamnn-torch":
        from streamnn.torch import StoreBatches
        ds = StoreBatches(os.path.join(base, "store.h5"), "train", batch_size=batch, seed=0)
        return ds.dataloader(num_workers=workers), lambda b: ids_nchw_rgb(b[0])
    if name == "streamnn-numpy":
        from streamnn.data.loader import Loader
        L = Loader(os.path.join(base, "store.h5"), "train", batch_size=batch, seed=0)

        def ids(b: Any) -> np.ndarray:
            p = np.rint(b[0][:3] * 255).astype(np.int64)
            return p[0] + 256 * p[1] + 65536 * p[2]
        return L, ids
    import torch
    from torch.utils.data import DataLoader, Dataset
    if name == "mds":
        no_torchvision()
        from streaming import StreamingDataLoader, StreamingDataset
        from streaming.base.util import clean_stale_shared_memory
        clean_stale_shared_memory()

        class MDS(StreamingDataset):
            def __getitem__(self, i: int) -> Any:
                r = super().__getitem__(i)
                return to_chw(np.frombuffer(r["image"], np.uint8).reshape(SIZE, SIZE, 3)), r["label"]
        ds = MDS(local=os.path.join(base, "mds"), shuffle=True, shuffle_seed=0, batch_size=batch)
        return StreamingDataLoader(ds, batch_size=batch, num_workers=workers), lambda b: ids_nchw_rgb(b[0])
    if name == "webdataset":
        import webdataset as wds
        urls = sorted(glob.glob(os.path.join(base, "webdataset", "*.tar")))
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0).shuffle(1000).to_tuple("img", "cls")
              .map(lambda s: (to_chw(np.frombuffer(s[0], np.uint8).reshape(SIZE, SIZE, 3)), int(s[1])))
              .batched(batch))
        return wds.WebLoader(ds, batch_size=None, num_workers=workers), lambda b: ids_nchw_rgb(b[0])
    if name == "litdata":
        no_torchvision()
        import litdata
        cache = os.path.join(work, "litdata-cache")
        shutil.rmtree(cache, ignore_errors=True)
        ds = litdata.StreamingDataset(input_dir=os.path.join(base, "litdata"), cache_dir=cache, shuffle=True, seed=0,
                                      transform=lambda r: (to_chw(np.asarray(r["image"])), r["label"]))
        return litdata.StreamingDataLoader(ds, batch_size=batch, num_workers=workers), lambda b: ids_nchw_rgb(b[0])
    if name == "grain":
        import grain
        from absl import flags
        flags.FLAGS.mark_as_parsed()  # grain's workers read its absl flags (their defaults here)

        class Parse(grain.transforms.Map):
            def map(self, r: bytes) -> dict[str, Any]:
                return {"image": to_chw(np.frombuffer(r, np.uint8, offset=1).reshape(SIZE, SIZE, 3)), "label": r[0]}
        src = grain.sources.ArrayRecordDataSource([os.path.join(base, "grain.array_record")])
        sampler = grain.samplers.IndexSampler(num_records=len(src), shuffle=True, seed=0, num_epochs=1,
                                              shard_options=grain.sharding.NoSharding())
        dl = grain.DataLoader(data_source=src, sampler=sampler, worker_count=workers,
                              operations=[Parse(), grain.transforms.Batch(batch)])
        return dl, lambda b: ids_nchw_rgb(b["image"])

    class Rowwise(Dataset):
        def __init__(self) -> None:
            self.f: Any = None
            self.files = json.load(open(os.path.join(work, "files.json")))
            self.n = int(open(os.path.join(base, "rows")).read())

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> Any:
            if name == "h5py":
                if self.f is None:
                    import h5py
                    self.f = h5py.File(os.path.join(base, "rows.h5"), "r")
                img, label = self.f["X"][i], int(self.f["y"][i])
            else:
                import cv2
                path, label = self.files[i % len(self.files)]
                img = stamp(cv2.resize(cv2.imread(path), (SIZE, SIZE), interpolation=cv2.INTER_AREA)[None],
                            np.array([i]))[0]
            return torch.from_numpy(to_chw(img)), label
    return (DataLoader(Rowwise(), batch_size=batch, shuffle=True, num_workers=workers,
                       generator=torch.Generator().manual_seed(0)), lambda b: ids_nchw_rgb(b[0]))


def child(a: argparse.Namespace) -> None:
    """One epoch (or a resume check) of one contender; prints a JSON line."""
    it, ids = loader(a.child, a.work, "resume" if a.phase == "resume" else "main", a.workers, a.batch)
    if a.phase != "resume":
        got, t, first = [], time.perf_counter(), None
        for b in it:
            got.append(ids(b))
            first = first or time.perf_counter() - t
            if a.limit and sum(map(len, got)) >= a.limit:
                break
        dt = time.perf_counter() - t
        rows = np.concatenate(got) if got else np.zeros(0, np.int64)
        result = {"samples": len(rows), "seconds": dt, "first": first, "ids": rows.tolist()}
    else:
        result = {"resume": resume_check(a, it, ids)}
    with open(a.result, "w") as f:  # (not stdout: a pipe nobody reads while the child runs would fill)
        json.dump(result, f)


def resume_check(a: argparse.Namespace, it: Any, ids: Any) -> str:
    """exact / complete (the rest, in another order) / wrong / no (no resume API)."""
    full = np.concatenate([ids(b) for b in it]).tolist()
    name = a.child
    fresh, _ = loader(name, a.work, "resume", a.workers, a.batch)
    first, state = [], None
    if name == "streamnn-numpy":
        for b in fresh:
            first += ids(b).tolist()
            if len(first) >= 10 * a.batch:
                break
        state = fresh.state_dict()
    elif name == "grain":
        walker = iter(fresh)
        for _ in range(10):
            first += ids(next(walker)).tolist()
        state = walker.get_state()
    elif name in ("streamnn-torch", "mds", "litdata"):
        for b in fresh:
            first += ids(b).tolist()
            if len(first) >= 10 * a.batch:
                break
        state = (fresh.batches if name == "streamnn-torch" else fresh).state_dict()
    else:
        return "no (no state to save)"
    again, _ = loader(name, a.work, "resume", a.workers, a.batch)
    if name == "grain":
        walker = iter(again)
        walker.set_state(state)
        rest = [i for b in walker for i in ids(b).tolist()]
    else:
        (again.batches if name == "streamnn-torch" else again).load_state_dict(state)
        rest = [i for b in again for i in ids(b).tolist()]
    if first + rest == full:
        return "exact"
    return "complete, other order" if sorted(first + rest) == sorted(full) else \
        f"wrong ({len(first) + len(rest)} samples, {len(set(first + rest))} distinct of {len(full)})"


# -- watching a child ---------------------------------------------------------------------------------
def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def watch(cmd: list[str], timeout: float) -> tuple[dict[str, Any], tuple[float, float], int]:
    """Run ``cmd`` (a child writing its JSON result to the file after its --result); that result, the
    tree's peak PSS and peak PSS without mapped files' pages (bytes), its bytes read from storage."""
    result = cmd[cmd.index("--result") + 1]
    if os.path.exists(result):
        os.remove(result)
    errors = open(result + ".err", "w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errors)
    peak, own, reads, t0 = 0.0, 0.0, {}, time.time()
    while proc.poll() is None:
        pss = anon = 0
        for p in tree(proc.pid):
            try:
                with open(f"/proc/{p}/smaps_rollup") as f:
                    kb = {line.split()[0]: int(line.split()[1]) for line in f if line.startswith("Pss")}
                pss += kb.get("Pss:", 0) * 1024
                anon += (kb.get("Pss_Anon:", 0) + kb.get("Pss_Shmem:", 0)) * 1024
                with open(f"/proc/{p}/io") as f:
                    reads[p] = next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
            except (OSError, StopIteration):
                pass
        peak, own = max(peak, pss), max(own, anon)
        if time.time() - t0 > timeout:
            proc.kill()
        time.sleep(0.05)
    proc.wait()
    errors.seek(0)
    err = errors.read()
    errors.close()
    if proc.returncode != 0 or not os.path.exists(result):
        last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
        return {"error": last[0][:120]}, (peak, own), sum(reads.values())
    with open(result) as f:
        return json.load(f), (peak, own), sum(reads.values())


def files_of(name: str, work: str) -> list[str]:
    base = os.path.join(work, "main")
    if name == "jpeg":
        return [f for f, _ in json.load(open(os.path.join(work, "files.json")))]
    where = {"streamnn-torch": "store.h5", "streamnn-numpy": "store.h5", "h5py": "rows.h5",
             "grain": "grain.array_record"}.get(name, name)
    path = os.path.join(base, where)
    return [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def resident(paths: list[str]) -> int:
    """Bytes of the files in the page cache (mincore over a read-only map of each)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for p in paths:
        size = os.path.getsize(p)
        if not size:
            continue
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
            view = np.frombuffer(m, np.uint8)
            vec = np.zeros(-(-size // page), np.uint8)
            if libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size),
                            ctypes.c_void_p(vec.ctypes.data)) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            total += int((vec & 1).sum()) * page
            del view
    return total


def cache(paths: list[str], drop: bool) -> None:
    """Drop the files' pages from the page cache, or read them all into it."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 24):
                    pass
        finally:
            os.close(fd)


FORMAT = {"streamnn-torch": "streamnn", "streamnn-numpy": "streamnn", "mds": "mds", "webdataset": "webdataset",
          "litdata": "litdata", "grain": "grain", "h5py": "h5py", "jpeg": None}
TARGET = {"streamnn": "store.h5", "h5py": "rows.h5", "grain": "grain.array_record"}


def prepare(a: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Decode the photos, write every contender's format (timed); returns rows/s and sizes."""
    images, labels, files, rate = decode_photos(a.photos)
    np.save(os.path.join(a.work, "photos.npy"), images)
    np.save(os.path.join(a.work, "labels.npy"), labels)
    json.dump([[f, int(c)] for f, c in zip(files, labels)], open(os.path.join(a.work, "files.json"), "w"))
    info: dict[str, Any] = {"decode": rate, "photos": len(files)}
    for size, rows in (("main", a.rows), ("resume", a.resume_rows)):
        base = os.path.join(a.work, size)
        os.makedirs(base, exist_ok=True)
        open(os.path.join(base, "rows"), "w").write(str(rows))
        for fmt in sorted({FORMAT[n] for n in names} - {None}):
            out = os.path.join(base, TARGET.get(fmt, fmt))
            code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import bench_peers as b; " \
                   f"b.convert({fmt!r}, {a.work!r}, {rows}, {out!r})"
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=a.timeout)
            dt = time.perf_counter() - t
            if size == "main":
                ok = r.returncode == 0
                nbytes = sum(os.path.getsize(f) for f in files_of_format(out))
                info[fmt] = {"rate": rows / dt if ok else None, "bytes": nbytes,
                             "error": None if ok else (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
    os.sync()
    return info


def files_of_format(out: str) -> list[str]:
    if os.path.isfile(out):
        return [out]
    return [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("photos", help="folder of JPEG photos in class folders")
    ap.add_argument("--work", required=True, help="an empty folder for the converted data (GBs)")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--resume-rows", type=int, default=3200)
    ap.add_argument("--repeats", type=int, default=3, help="warm rounds (contenders interleaved)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--jpeg-samples", type=int, default=10_000)
    ap.add_argument("--only", default=",".join(NAMES), help="contenders, comma-separated")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="epoch", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work = os.path.abspath(a.work)
    if a.child:
        child(a)
        return
    names = [n for n in a.only.split(",") if n]
    load0 = os.getloadavg()
    os.makedirs(a.work, exist_ok=True)
    info = prepare(a, names)

    def cmd(name: str, phase: str) -> list[str]:
        limit = a.jpeg_samples if name == "jpeg" else 0
        return [sys.executable, os.path.abspath(__file__), a.photos, "--work", a.work, "--child", name,
                "--phase", phase, "--workers", str(a.workers), "--batch", str(a.batch), "--limit", str(limit),
                "--result", os.path.join(a.work, "result.json")]
    res: dict[str, dict[str, Any]] = {n: {"warm": [], "errors": []} for n in names}
    for _ in range(a.repeats):
        for n in names:
            cache(files_of(n, a.work), drop=False)
            r, peak, _ = watch(cmd(n, "epoch"), a.timeout)
            if "error" in r:
                res[n]["errors"].append(r["error"])
                continue
            res[n]["warm"].append(r["samples"] / r["seconds"])
            res[n].setdefault("first", []).append(r["first"])
            res[n]["pss"] = max(res[n].get("pss", 0), peak[0])
            res[n]["own"] = max(res[n].get("own", 0), peak[1])
            ids = np.asarray(r["ids"])
            res[n]["once"] = len(np.unique(ids)) == len(ids) and (n == "jpeg" or len(ids) == a.rows)
            res[n]["spread"] = float(np.abs(np.diff(ids)).mean() / a.rows) if len(ids) > 1 else None
    for n in names:
        cache(files_of(n, a.work), drop=True)
        r, _, _ = watch(cmd(n, "epoch"), a.timeout)
        if "error" in r:
            res[n]["errors"].append(r["error"])
        else:
            res[n]["cold"] = r["samples"] / r["seconds"]
            res[n]["read"] = resident(files_of(n, a.work))  # the data's pages the epoch brought in
        r, _, _ = watch(cmd(n, "resume"), a.timeout)
        res[n]["resume"] = r.get("resume", "error: " + r.get("error", "?"))
    load1 = os.getloadavg()
    report(a, names, info, res, load0, load1)


def report(a: argparse.Namespace, names: list[str], info: dict[str, Any], res: dict[str, Any],
           load0: tuple[float, ...], load1: tuple[float, ...]) -> None:
    print(f"{a.rows:,} rows of {SIZE}x{SIZE}x3 uint8 ({info['photos']} photos decoded at "
          f"{info['decode']:.0f}/s, tiled), batch {a.batch}, {a.workers} workers, {a.repeats} warm rounds; "
          f"load average {load0[0]:.1f} before, {load1[0]:.1f} after ({os.cpu_count()} cores)\n")
    print("| loader | convert rows/s | on disk | warm samples/s | first batch | cold samples/s | peak PSS (not "
          "of files) | read (cold) | once per epoch | shuffle (spread) | resume |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    data = a.rows * SIZE * SIZE * 3
    for n in names:
        r, conv = res[n], info.get(FORMAT[n]) or {}
        warm = f"{statistics.median(r['warm']):,.0f}" if r["warm"] else "error"
        cold = f"{r['cold']:,.0f}" if "cold" in r else "error"
        rate = "-" if FORMAT[n] is None else (f"{conv['rate']:,.0f}" if conv.get("rate") else
                                               f"error: {conv.get('error')}")
        disk = "-" if FORMAT[n] is None else f"{conv.get('bytes', 0) / 1e9:.2f} GB"
        read = "-" if "read" not in r else f"{r['read'] / 1e9:.2f} GB" + \
            (f" ({r['read'] / data:.2f}x)" if FORMAT[n] else " (JPEG files)")
        first = f"{statistics.median(r['first']):.2f} s" if r.get("first") else "-"
        spread = f"{r['spread']:.2f}" if r.get("spread") is not None else "-"
        once = {True: "yes", False: "no"}.get(r.get("once"), "-")
        if n == "jpeg":
            warm, cold, once = warm + f" (first {a.jpeg_samples:,})", cold + " (idem)", once + " (of those)"
        print(f"| {n} | {rate} | {disk} | {warm} | {first} | {cold} | {r.get('pss', 0) / 2**20:,.0f} MB ({r.get('own', 0) / 2**20:,.0f} MB) | {read} | {once} | "
              f"{SHUFFLE[n]} ({spread}) | {r['resume']} |")
    for n in names:
        for e in sorted(set(res[n]["errors"])):
            print(f"\n{n}: {e}")


if __name__ == "__main__":
    main()
