"""Stage ``evaluate_3d@<run>``: a ``runs_3d`` model on whole test scans, with bootstrap CIs over patients.

Each test scan (the first ``max_test_scans`` of the test split in ``slices.csv`` order, or
all) is segmented by sliding-window inference (windows of ``crop_size``, ``overlap``; seed
003: 0.5) over the whole volume or its lung box (``region``), thresholded at
``evaluate.seg_threshold`` and scored (:mod:`chestssl.eval.seg3d`): Dice without the
background per scan and over all voxels, and the per-nodule detection rate, with percentile
intervals of a bootstrap over patients. ``items.npz`` keeps the per-scan statistics for the
report's paired comparison of a pretrained run with its scratch ``baseline``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file
from chestssl.params import run_3d_entry


def scans_to_segment(processed_dir: str | Path, limit: int) -> list[tuple[str, str]]:
    """``(scan_id, patient_id)`` of the test split in ``slices.csv`` order, the first ``limit`` (0: all)."""
    from chestssl.data.processed import DatasetError, read_slices

    slices = read_slices(processed_dir)
    scans = slices.loc[slices["split"] == "test", ["scan_id", "patient_id"]].drop_duplicates("scan_id")
    if scans.empty:
        raise DatasetError(f"no scans in the test split of {processed_dir}; change preprocess.split")
    pairs = [(str(s), str(p)) for s, p in scans.itertuples(index=False)]
    return pairs[:limit] if limit else pairs


def evaluate_3d(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    model_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score ``runs_3d.<name>`` on the test scans; write ``metrics.json`` and ``items.npz`` to ``out_dir``.

    Args:
        params: the loaded params (the run, ``seed``, ``evaluate``).
        name: an entry under ``runs_3d``.
        processed_dir: ``data/processed``.
        model_path: the fine-tuned model; default :func:`chestssl.paths.finetune_3d_model_path`.
        out_dir: default :func:`chestssl.paths.evaluate_3d_dir`.

    Returns the metrics.
    """
    import time

    from chestssl.data.processed import load_scan
    from chestssl.eval.seg3d import save_items_3d, scan_statistics, score_items_3d, segment_volume, load_items_3d
    from chestssl.inference import auto_device
    from chestssl.models.backbones import load_encoder
    from chestssl.tasks.seg3d import Segmentation3DTask

    run = run_3d_entry(params, name)
    seed, evaluate = int(params["seed"]), params["evaluate"]
    model_path = Path(model_path) if model_path is not None else paths.finetune_3d_model_path(name)
    out_dir = Path(out_dir) if out_dir is not None else paths.evaluate_3d_dir(name)
    saved = load_model_file(model_path, f"finetune_3d@{name}", required=("encoder", "state_dict"))
    device = auto_device()
    model = Segmentation3DTask(name, run, load_encoder(saved["encoder"]), seed)
    model.load_state_dict(saved["state_dict"])
    model = model.to(device).eval()
    started = time.perf_counter()
    scans, rows = scans_to_segment(processed_dir, run["max_test_scans"]), []
    for scan_id, _ in scans:
        scan = load_scan(processed_dir, scan_id)
        image, ids = scan["image"], scan["mask"]
        if run["region"] == "lung_box":
            y0, y1, x0, x1 = (int(v) for v in scan["lung_box"])
            image, ids = image[:, y0:y1, x0:x1], ids[:, y0:y1, x0:x1]
        probability = segment_volume(model, image, run["crop_size"], run["overlap"], run["sw_batch_size"], device)
        rows.append(scan_statistics(probability > evaluate["seg_threshold"], ids))
    items_path = out_dir / "items.npz"
    save_items_3d(items_path, [p for _, p in scans], [s for s, _ in scans], rows)
    metrics = score_items_3d(load_items_3d(items_path), evaluate["bootstrap_samples"], evaluate["confidence"], seed)
    metrics.update(region=run["region"], roi_size=run["crop_size"], overlap=run["overlap"],
                   inference_seconds=round(time.perf_counter() - started, 1))
    write_json(out_dir / "metrics.json", metrics)
    return metrics
