"""Stage ``finetune_3d@<run>``: seed 003's downstream, 3D nodule segmentation with SwinUNETR 3D.

The run (a ``runs_3d`` entry) builds MONAI's ``SwinUNETR`` (``spatial_dims`` 3) on the 3D Swin
encoder its ``init`` pretraining stage exported (a scratch entry: the same seeded random
weights) and trains the whole network with ``DiceCELoss`` (:mod:`chestssl.tasks.seg3d`) on
random crops of the training scans drawn anew every epoch
(:class:`~chestssl.data.crops.EpochCropDataset`: ``crops_per_scan`` per scan, a share
``positive_fraction`` centred on a nodule voxel), validated on crops of the validation scans
drawn once (:class:`~chestssl.data.crops.CropDataset`), through the one loop
(:func:`chestssl.train.loop.fit`); the weights of the best validation Dice are written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file, save_model_file
from chestssl.params import run_3d_entry

#: The validation metric that picks the best epoch.
MONITOR = ("val/dice", "max")


def finetune_3d(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    encoder_path: str | Path | None = None,
    model_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any] | None:
    """Fine-tune ``runs_3d.<name>`` and write its model, ``metrics.json``, ``cost.json`` and curves.

    Args:
        params: the loaded params (the run, ``seed``, ``preprocess.min_nodule_pixels``).
        name: an entry under ``runs_3d``.
        processed_dir: ``data/processed``.
        encoder_path: the encoder of the run's ``init`` entry; default :func:`chestssl.paths.encoder_path`.
        model_path: receives the model; default :func:`chestssl.paths.finetune_3d_model_path`.
        report_dir: receives ``live/``, ``metrics.json`` and ``cost.json``; default
            :func:`chestssl.paths.finetune_3d_report_dir`.
        checkpoint_path: the loop's resume checkpoint; default ``checkpoints/finetune_3d/<name>.pt``.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.data.crops import CropDataset, EpochCropDataset
    from chestssl.models.backbones import load_encoder
    from chestssl.tasks.seg3d import Segmentation3DTask
    from chestssl.train.checkpoint import stage_inputs
    from chestssl.train.cost_probe import fit_cost
    from chestssl.train.loop import fit
    from chestssl.train.metrics import flat_metrics

    run = run_3d_entry(params, name)
    seed = int(params["seed"])
    processed_dir = Path(processed_dir)
    encoder_file = Path(encoder_path) if encoder_path is not None else paths.encoder_path(run["init"])
    model_path = Path(model_path) if model_path is not None else paths.finetune_3d_model_path(name)
    report_dir = Path(report_dir) if report_dir is not None else paths.finetune_3d_report_dir(name)
    checkpoint_path = (Path(checkpoint_path) if checkpoint_path is not None
                       else paths.checkpoint_path("finetune_3d", name))
    encoder_payload = load_model_file(encoder_file, paths.pretrain_stage(run["init"], params))
    encoder = load_encoder(encoder_payload, source=f"encoder of runs_3d.{name}.init ({run['init']!r})")
    min_voxels = int(params["preprocess"]["min_nodule_pixels"])
    crop = dict(size=run["crop_size"], crops_per_scan=run["crops_per_scan"],
                positive_fraction=run["positive_fraction"], seed=seed, min_nodule_voxels=min_voxels)
    train = EpochCropDataset(processed_dir, "train", **crop)
    val = CropDataset(processed_dir, "val", **crop)
    model = Segmentation3DTask(name, run, encoder, seed)
    monitor, mode = MONITOR
    inputs = stage_inputs({"run": run}, [processed_dir, encoder_file])
    result = fit(model, train, val, run["train"], report_dir / "live", checkpoint_path, seed,
                 monitor=monitor, mode=mode, inputs=inputs)
    if not result.is_main:
        return None
    save_model_file(model_path, {"run": name, "config": run, "encoder": encoder_payload,
                                 "state_dict": result.best_state, "training_seed": seed})
    metrics = {"epochs": result.epochs, "steps": result.steps, "best_val_dice": result.best_value,
               "train_crops_per_epoch": len(train), "val_crops": len(val), **flat_metrics(result.final_metrics)}
    write_json(report_dir / "cost.json", fit_cost(model, result))
    write_json(report_dir / "metrics.json", metrics)
    return metrics
