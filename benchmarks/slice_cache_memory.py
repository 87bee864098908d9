"""Memory of SliceDataset with its memory-mapped slice cache against the former in-RAM slices.

On a synthetic ``data/processed`` folder (``--scans`` scans of ``--slices`` random slices,
written with the project's writer in a temporary folder), the ``train`` split's
``pretrain`` slices at ``--size`` px, each measured in a fresh process:

- in RAM (the baseline): what SliceDataset did before the cache, each scan decompressed
  and its resized slices kept in (N, S, S) float16 / uint8 tensors of the process;
- cache, cold: SliceDataset writing the cache entry (scan by scan into the memmaps);
- cache, warm: SliceDataset opening the entry another process wrote (every later rank,
  worker and stage).

Each process builds the dataset and reads every item. Per process, less what it held after
its imports: the peak resident size (``VmHWM``), and at the end its resident anonymous
memory (``RssAnon``: its own) and file pages (``RssFile``: the page cache's, shared with
other processes and dropped by the kernel when memory runs short). Then ``--processes`` processes at once, as DDP ranks or
DataLoader workers: the sum of their proportional set sizes (``Pss`` of
``/proc/<pid>/smaps_rollup``: a page shared by k processes counts 1/k in each) after
reading every item, less the sum after the imports. Ratios are against the in-RAM baseline.

    python benchmarks/slice_cache_memory.py --scans 32 --slices 125 --side 256 --size 128

Results are printed and written atomically to ``reports/benchmarks/slice_cache_memory.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("in_ram", "cache_cold", "cache_warm")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=32, help="synthetic scans, all in the train split (default 32)")
    parser.add_argument("--slices", type=int, default=125, help="slices per scan (default 125)")
    parser.add_argument("--side", type=int, default=256, help="side of the processed slices (default 256)")
    parser.add_argument("--size", type=int, default=128, help="SliceDataset size (default 128, as slices.side)")
    parser.add_argument("--processes", type=int, default=4, help="processes reading one dataset at once (default 4)")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "benchmarks" / "slice_cache_memory.json")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--processed", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("scans", "slices", "side", "size", "processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def write_processed(root: Path, scans: int, slices: int, side: int) -> None:
    """A ``data/processed`` folder of ``scans`` patients (one scan each, all in train): a
    bright ellipse with noise on air, slices ``side`` x ``side - 16`` (so padded), a
    spherical nodule in every other scan."""
    import numpy as np
    import pandas as pd

    from chestssl.data.processed import NODULE_COLUMNS, SLICE_COLUMNS
    from chestssl.io import write_json, write_npz

    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[:slices, :side, :side - 16]
    body = ((yy - side / 2) / (0.42 * side)) ** 2 + ((xx - side / 2 + 8) / (0.45 * side)) ** 2 <= 1
    sphere = (zz - slices / 2) ** 2 / 9 + (yy - side / 2) ** 2 + (xx - side / 3) ** 2 <= (side / 20) ** 2
    slice_rows, nodule_rows = [], []
    for i in range(scans):
        pid = f"p{i:04d}"
        noise = rng.integers(0, 16, size=(slices, side, side - 16)) / 256  # quantised: quick to compress
        image = np.where(body, 0.3 + noise, 0.0).astype(np.float16)
        mask = np.zeros(image.shape, np.uint8)
        if i % 2:
            mask[sphere] = 1
            image[sphere] = 0.8
            nodule_rows.append([pid, pid, 1, slices / 2, side / 2, side / 3, 10.0, 4, 4.0, 5.0, 6.0, "train"])
        pixels = mask.reshape(slices, -1).sum(axis=1)
        for z in range(slices):
            slice_rows.append([pid, pid, z, int(pixels[z]), 4.0 if pixels[z] else 0.0,
                               1 if pixels[z] > 8 else (0 if pixels[z] == 0 else -1), "train"])
        write_npz(root / "scans" / f"{pid}.npz", image=image, mask=mask,
                  spacing=np.array([2.5, 1.5, 1.5], np.float32), origin_index=np.zeros(3, np.int32))
    pd.DataFrame(slice_rows, columns=SLICE_COLUMNS).to_csv(root / "slices.csv", index=False)
    pd.DataFrame(nodule_rows, columns=NODULE_COLUMNS).to_csv(root / "nodules.csv", index=False)
    write_json(root / "splits.json", {"train": [f"p{i:04d}" for i in range(scans)], "val": [], "test": [], "seed": 0})


def in_ram_slices(processed: Path, size: int) -> tuple[Any, Any]:
    """The train split's pretraining slices as SliceDataset held them before the cache:
    (N, S, S) float16 images and uint8 masks in this process's memory."""
    import numpy as np
    import torch

    from chestssl.data.datasets import square_resize
    from chestssl.data.processed import load_scan, read_slices

    rows = read_slices(processed)
    rows = rows[rows["split"] == "train"].sort_values(["scan_id", "slice_index"], kind="stable").reset_index(drop=True)
    images = torch.empty((len(rows), size, size), dtype=torch.float16)
    masks = torch.empty((len(rows), size, size), dtype=torch.uint8)
    for scan_id, scan_rows in rows.groupby("scan_id", sort=False):
        scan = load_scan(processed, scan_id)
        wanted = scan_rows["slice_index"].to_numpy()
        image, mask = square_resize(scan["image"][wanted], scan["mask"][wanted] > 0, size)
        positions = torch.from_numpy(scan_rows.index.to_numpy(dtype=np.int64, copy=True))
        images[positions] = image.to(torch.float16)
        masks[positions] = mask.to(torch.uint8)
    return images, masks


def _status_kib(pid: int | str = "self") -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.split()[-1:] == ["kB"]}


def pss_kib(pid: int) -> int | None:
    """The process's proportional set size, where the kernel tells it (Linux 4.14+)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return None


def child(mode: str, processed: Path, size: int) -> None:
    """Build the dataset of ``mode`` and read every item; report between steps on stdout.

    Prints ``imported <VmRSS kB> <RssAnon kB> <RssFile kB>``, waits for a line on stdin, builds and reads, prints
    ``done <seconds> <VmHWM kB> <RssAnon kB> <RssFile kB>``, and exits at the end of stdin.
    """
    import torch

    from chestssl.data.datasets import SliceDataset

    torch.set_num_threads(1)
    status = _status_kib()
    print("imported", status["VmRSS"], status["RssAnon"], status["RssFile"], flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    checksum = 0.0
    if mode == "in_ram":
        images, masks = in_ram_slices(processed, size)
        for i in range(len(images)):  # the former __getitem__
            image, mask = images[i].unsqueeze(0).to(torch.float32), masks[i].unsqueeze(0).to(torch.float32)
            checksum += float(image[0, 0, 0]) + float(mask[0, 0, 0])
    else:
        data = SliceDataset(processed, "train", size, "pretrain")
        for i in range(len(data)):
            item = data[i]
            checksum += float(item["image"][0, 0, 0]) + float(item["mask"][0, 0, 0])
    seconds = time.perf_counter() - start
    status = _status_kib()
    print("done", f"{seconds:.3f}", status["VmHWM"], status["RssAnon"], status["RssFile"], flush=True)
    sys.stdin.read()


def run_children(mode: str, count: int, processed: Path, size: int, env: dict[str, str]) -> list[dict[str, float]]:
    """``count`` children of ``mode`` at once; for each, its figures less those after its imports, and its Pss
    after the imports and at the end."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--processed", str(processed),
               "--size", str(size)]
    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(count)]
    try:
        imported = [[int(kib) for kib in proc.stdout.readline().split()[1:]] for proc in procs]
        pss_imported = [pss_kib(proc.pid) for proc in procs]
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        done = [proc.stdout.readline().split() for proc in procs]
        if any(not line or line[0] != "done" for line in done):
            raise RuntimeError(f"a {mode} process failed: {done}")
        pss_done = [pss_kib(proc.pid) for proc in procs]
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=600)
    return [{"seconds": float(line[1]), "peak_kib": int(line[2]) - rss[0], "rss_anon_kib": int(line[3]) - rss[1],
             "rss_file_kib": int(line[4]) - rss[2], "pss_imported_kib": before, "pss_done_kib": after}
            for line, rss, before, after in zip(done, imported, pss_imported, pss_done)]


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child:
        child(args.child, args.processed, args.size)
        return
    from chestssl.io import write_json
    from chestssl.paths import CACHE_DIR_ENV

    with tempfile.TemporaryDirectory() as tmp:
        processed = Path(tmp) / "processed"
        start = time.perf_counter()
        write_processed(processed, args.scans, args.slices, args.side)
        print(f"wrote {args.scans} scans of {args.slices} x {args.side} x {args.side - 16} in "
              f"{time.perf_counter() - start:.0f} s")
        env = {**os.environ, CACHE_DIR_ENV: str(Path(tmp) / "cache"), "OMP_NUM_THREADS": "1"}
        single = {mode: run_children(mode, 1, processed, args.size, env)[0] for mode in MODES}
        shared = {mode: run_children(mode, args.processes, processed, args.size, env)
                  for mode in ("in_ram", "cache_warm")}
        cache_mib = sum(f.stat().st_size for f in (Path(tmp) / "cache").rglob("*.npy")) / 2**20

    slices = args.scans * args.slices
    result: dict[str, Any] = {"scans": args.scans, "slices": slices, "side": args.side, "size": args.size,
                              "processes": args.processes, "cache_mib": cache_mib,
                              "machine": f"{platform.machine()}, {platform.python_version()}, {os.cpu_count()} CPUs"}
    for mode, figures in single.items():
        result[mode] = {"seconds": figures["seconds"], "peak_mib": figures["peak_kib"] / 1024,
                        "anon_mib": figures["rss_anon_kib"] / 1024, "file_mib": figures["rss_file_kib"] / 1024}
    for mode in ("cache_cold", "cache_warm"):
        for figure in ("peak", "anon"):
            result[mode][f"{figure}_ratio"] = result[mode][f"{figure}_mib"] / result["in_ram"][f"{figure}_mib"]
    pss_known = all(f["pss_done_kib"] is not None for figures in shared.values() for f in figures)
    if pss_known:
        for mode, figures in shared.items():
            result[f"{mode}_x{args.processes}_pss_mib"] = sum(
                f["pss_done_kib"] - f["pss_imported_kib"] for f in figures) / 1024
        result["shared_pss_ratio"] = (result[f"cache_warm_x{args.processes}_pss_mib"]
                                      / result[f"in_ram_x{args.processes}_pss_mib"])
    write_json(args.out, result)

    print(f"{slices} slices at {args.size} px (arrays {slices * args.size ** 2 * 3 / 2**20:.0f} MiB; "
          f"cache on disk {cache_mib:.0f} MiB)")
    print(f"{'one process':<14} {'seconds':>8} {'peak MiB':>9} {'ratio':>6} {'anon MiB':>9} {'ratio':>6} "
          f"{'file MiB':>9}")
    for mode in MODES:
        row = result[mode]
        print(f"  {mode:<12} {row['seconds']:>8.1f} {row['peak_mib']:>9.0f} {row.get('peak_ratio', 1.0):>6.2f} "
              f"{row['anon_mib']:>9.0f} {row.get('anon_ratio', 1.0):>6.2f} {row['file_mib']:>9.0f}")
    print("  (less each process's figures after its imports; peak: VmHWM; anon, file: RssAnon, RssFile at the end)")
    if pss_known:
        print(f"{args.processes} processes at once, Pss summed (less after imports): in RAM "
              f"{result[f'in_ram_x{args.processes}_pss_mib']:.0f} MiB, cache "
              f"{result[f'cache_warm_x{args.processes}_pss_mib']:.0f} MiB, ratio {result['shared_pss_ratio']:.2f}")
    else:
        print("Pss unavailable (no /proc/<pid>/smaps_rollup): the shared figures are left out")


if __name__ == "__main__":
    main()
