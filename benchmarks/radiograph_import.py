"""Throughput and memory of importing a chest X-ray dataset into the radiographs folder.

On ``--images`` synthetic radiographs in the CheXpert-v1.0-small layout (JPEG, 390 x 320,
as that release's; generated in a temporary folder, one frontal and, for every other
study, one lateral view):

- baseline: the loop every reader of such a dataset runs, ``load_radiograph`` of each
  listed image into one in-memory array;
- ours: :func:`chestssl.data.cxr_import.import_radiographs` (the same reading and
  resizing, plus the label table, the study grouping and the memory-mapped
  ``images.npy`` written with resume checkpoints).

Both are timed (best of ``--repeats``) for images/s and the overhead ratio ours / baseline
(target <= 1.25). Peak Python-visible memory (``tracemalloc``, which sees NumPy's buffers)
is measured in a separate pass: the baseline holds every image, ours one at a time, so the
ratio ours / baseline shows the memory staying flat as the dataset grows.

    python benchmarks/radiograph_import.py --images 2000 --size 64

Results are printed and written atomically to ``reports/benchmarks/radiograph_import.json``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_OVERHEAD = 1.25
#: CheXpert-v1.0-small's image size (width, height).
IMAGE_SIZE = (390, 320)


def make_chexpert_tree(root: Path, images: int) -> None:
    """A CheXpert-v1.0-small tree of ``images`` JPEGs: smooth chest-like gradients with noise."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from chestssl.data.cxr import CHEXPERT_LABELS

    rng = np.random.default_rng(0)
    width, height = IMAGE_SIZE
    rows, cols = np.mgrid[0:height, 0:width]
    base = 120 + 60 * np.cos((cols - width / 2) / width * np.pi) * np.sin(rows / height * np.pi)
    train, valid = [], []
    patient, written = 0, 0
    while written < images:
        patient += 1
        views = ["frontal", "lateral"] if patient % 2 == 0 and written + 2 <= images else ["frontal"]
        for number, view in enumerate(views, start=1):
            relative = f"train/patient{patient:05d}/study1/view{number}_{view}.jpg"
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / relative, quality=90)
            labels = rng.choice(["1.0", "0.0", "-1.0", ""], size=len(CHEXPERT_LABELS))
            row = [f"{root.name}/{relative}", "Female", "60", view.capitalize(), "PA" if view == "frontal" else "",
                   *labels]
            (valid if patient % 10 == 0 else train).append(row)
            written += 1
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    pd.DataFrame(train, columns=header).to_csv(root / "train.csv", index=False)
    pd.DataFrame(valid, columns=header).to_csv(root / "valid.csv", index=False)


def best_seconds(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(run: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    import numpy as np

    from chestssl.data.cxr import load_radiograph, read_cxr_dataset
    from chestssl.data.cxr_import import import_radiographs
    from chestssl.io import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "CheXpert-v1.0-small"
        make_chexpert_tree(root, args.images)
        cfg = {"source": "chexpert", "root": str(root)}
        paths = read_cxr_dataset(cfg)[0]["path"].tolist()

        def baseline() -> np.ndarray:
            return np.stack([load_radiograph(path, args.size) for path in paths])

        def ours() -> None:
            import_radiographs(cfg, Path(tmp) / "radiographs", args.size)

        baseline(), ours()  # warm the page cache and imports
        base_s, ours_s = best_seconds(baseline, args.repeats), best_seconds(ours, args.repeats)
        base_peak, ours_peak = peak_bytes(baseline), peak_bytes(ours)
        stored = (Path(tmp) / "radiographs" / "images.npy").stat().st_size

    result = {
        "images": len(paths),
        "size": args.size,
        "baseline_images_per_s": len(paths) / base_s,
        "ours_images_per_s": len(paths) / ours_s,
        "overhead_ratio": ours_s / base_s,
        "target_overhead": TARGET_OVERHEAD,
        "baseline_peak_mib": base_peak / 2**20,
        "ours_peak_mib": ours_peak / 2**20,
        "memory_ratio": ours_peak / base_peak,
        "images_npy_mib": stored / 2**20,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    write_json(REPO / "reports" / "benchmarks" / "radiograph_import.json", result)
    print(f"{len(paths)} radiographs at {args.size}x{args.size}")
    print(f"  baseline (load into memory): {result['baseline_images_per_s']:.0f} images/s, "
          f"peak {result['baseline_peak_mib']:.1f} MiB")
    print(f"  import_radiographs:          {result['ours_images_per_s']:.0f} images/s, "
          f"peak {result['ours_peak_mib']:.1f} MiB (images.npy {result['images_npy_mib']:.1f} MiB)")
    print(f"  overhead ours / baseline: {result['overhead_ratio']:.2f} (target <= {TARGET_OVERHEAD}); "
          f"memory ours / baseline: {result['memory_ratio']:.2f}")


if __name__ == "__main__":
    main()
