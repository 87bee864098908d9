"""Training steps of the full protocol's models on a GPU: time, memory, finite losses, FLOP/s.

Each model is built as its stage builds it, from the full profile (``params.yaml`` with
``params/lidc-full.yaml`` merged in, as ``python -m chestssl.profiles`` would write it):
seed 003's 3D Disruptive Autoencoder (``dae_all_3d``: 96^3 crops, batch 2, 8 accumulated
batches a step), seed 000's 2D autoencoders (``ae_cnn_attention``, ``ae_swin``), seed
004's ViT MAE (``mae``), seed 001's Barlow Twins (``barlow_twins``), and a downstream
SwinUNETR segmentation fine-tune (``seg_swinunetr_swin_dice``, from ``ae_swin``'s
encoder). Each then trains with the real :func:`chestssl.train.loop.fit` on a synthetic
map-style dataset whose items have the stage's format (``image`` and ``mask`` (1, *S),
``label``, ids), for a few optimisation steps in each precision: ``fp32`` (no AMP),
``fp16`` (autocast + GradScaler) and ``bf16`` (autocast, no scaling), whatever the
profile's own ``train.amp``.

Per model and precision it reports:

- seconds per optimisation step after the warm-up steps (the GPU synchronised at each
  step's end; data loading overlaps in the loader's worker processes, as in a stage);
- peak GPU memory (``torch.cuda.max_memory_allocated`` over the fit);
- whether every logged loss is finite (the loop logs every step here), and for fp16 how
  many steps the GradScaler skipped;
- FLOPs per step as :mod:`chestssl.cost` counts them (a fit in the cost probe's mode,
  :mod:`chestssl.train.cost_probe`: ``FlopCounterMode``, forward and backward), the
  achieved TFLOP/s and its share of an H100/H200 SXM's dense peak;
- the seconds per step :mod:`chestssl.cost` assumes for those FLOPs (its default GPU and
  utilisation), beside the measured ones.

Run on a GPU machine from the repository root::

    python benchmarks/gpu_training.py --out reports/benchmarks/gpu_training.json
    python benchmarks/gpu_training.py --models mae,barlow_twins --precisions bf16 --steps 10

``--device cpu --tiny`` runs the same code end to end on a CPU at the default (quick)
params' sizes (3D crops of 64^3), batches of 2 without accumulation, one warm-up and one
timed step (mixed precision is fp32 on the CPU).
Resume after an interruption on CUDA is checked by the training loop's tests
(``CHESTSSL_TEST_DEVICE=cuda python -m pytest tests/train/test_loop.py``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

#: Dense peak throughput of an H100 / H200 SXM (the same Hopper GH100 chip and clocks; the
#: H200 only has more and faster memory), from NVIDIA's data sheets, without sparsity.
PEAK_BF16 = 989e12
PEAK_FP16 = 989e12
#: fp32 inputs on the tensor cores (cuDNN convolutions use TF32 by default; matrix products
#: only with ``torch.backends.cuda.matmul.allow_tf32``).
PEAK_TF32 = 494e12
#: fp32 on the CUDA cores (what :mod:`chestssl.cost` counts fp32 fits at).
PEAK_FP32 = 67e12
PEAKS = {"bf16": PEAK_BF16, "fp16": PEAK_FP16, "fp32": PEAK_FP32}

PROFILE = REPO_ROOT / "params" / "lidc-full.yaml"
PRETRAIN_MODELS = ("dae_all_3d", "ae_cnn_attention", "ae_swin", "mae", "barlow_twins")
SEG_RUN = "seg_swinunetr_swin_dice"
MODELS = (*PRETRAIN_MODELS, SEG_RUN)
PRECISIONS = ("fp32", "bf16", "fp16")
#: ``--tiny``: the 3D crops' side (SwinUNETR's decoder needs at least 64).
TINY_CROP = 64


# ----------------------------------------------------------------------------- params and models


def load_params(tiny: bool) -> dict[str, Any]:
    """The validated params of the full profile, or (``tiny``) the default params with the
    profile's ``dae_all_3d`` entry on the default 2D Swin's sizes and 64^3 crops."""
    from chestssl.methods import method_configs
    from chestssl.params import read_raw_params, read_yaml, validate
    from chestssl.profiles import merge_profile

    raw, _ = read_raw_params(REPO_ROOT / "params.yaml")
    profile = read_yaml(PROFILE)
    if tiny:
        raw["backbones"]["swin_3d"] = {**raw["backbones"]["swin"], "spatial_dims": 3}
        raw["methods"]["dae_all_3d"] = copy.deepcopy(profile["methods"]["dae_all_3d"])
        raw["crops"]["side"] = TINY_CROP
        source = "params.yaml + dae_all_3d"
    else:
        merge_profile(raw, profile)
        source = f"params.yaml + {PROFILE.name}"
    return validate(raw, source, method_configs())


def build_model(name: str, params: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any], tuple[int, ...], str]:
    """(model, its ``train`` block, the item's spatial shape, the monitor) as the stage builds them."""
    from chestssl.methods import build_method
    from chestssl.params import pretrain_entry
    from chestssl.tasks import build_task

    seed = params["seed"]
    if name in PRETRAIN_MODELS:
        _, cfg = pretrain_entry(params, name)
        method = build_method(name, cfg, seed)
        dims = int(cfg["backbone"].get("spatial_dims", 2))
        side = params["crops"]["side"] if dims == 3 else params["slices"]["side"]
        return method, dict(cfg["train"]), (side,) * dims, method.monitor[0]
    run = params["runs"][name]
    _, init_cfg = pretrain_entry(params, run["init"])
    encoder = build_method(run["init"], init_cfg, seed).export()
    task = build_task(run, encoder, seed, name=name, train_labels=[0, 1] * 8)
    side = params["slices"]["side"]
    return task, dict(run["train"]), (side, side), "val/loss"


class SyntheticItems(Dataset):
    """``count`` items in the format of the slice and crop datasets: ``image`` (1, *S) in
    [0, 1], ``mask`` (1, *S) with a cube (or square) of nodule at the centre of every other
    item, ``label``, ``malignancy``, ids. Images are smooth random fields, made once."""

    def __init__(self, count: int, shape: tuple[int, ...], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        distinct = min(count, 8)
        coarse = torch.rand(distinct, 1, *(max(2, s // 8) for s in shape), generator=generator)
        mode = "trilinear" if len(shape) == 3 else "bilinear"
        self.images = torch.nn.functional.interpolate(coarse, size=shape, mode=mode, align_corners=False)
        self.mask = torch.zeros(1, *shape)
        self.mask[(slice(None), *(slice(s // 2 - max(1, s // 16), s // 2 + max(1, s // 16)) for s in shape))] = 1.0
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        nodule = index % 2 == 1
        return {
            "image": self.images[index % len(self.images)].clone(),
            "mask": self.mask.clone() if nodule else torch.zeros_like(self.mask),
            "label": torch.tensor(int(nodule), dtype=torch.int64),
            "malignancy": torch.tensor(3.0 if nodule else 0.0),
            "patient_id": f"p{index // 4}",
            "scan_id": f"s{index // 4}",
            "slice_index": index,
        }


# ----------------------------------------------------------------------------- measurement


class StepClock:
    """Times optimisation steps: the loop calls ``GradScaler.update`` once per step (a
    disabled scaler too), so the wrapped method synchronises the GPU and stamps the time;
    it also records the loss scale, whose drops are the steps fp16 skipped."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps, self.scales = device, [], []  # scales: of an enabled scaler only

    def __enter__(self) -> "StepClock":
        self.original = torch.amp.GradScaler.update
        clock = self

        def update(scaler, new_scale=None):
            clock.original(scaler, new_scale)
            if clock.device.type == "cuda":
                torch.cuda.synchronize(clock.device)
            clock.stamps.append(time.perf_counter())
            if scaler.is_enabled():
                clock.scales.append(float(scaler.get_scale()))

        torch.amp.GradScaler.update = update
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.amp.GradScaler.update = self.original


def train_config(base: dict[str, Any], precision: str, device: str, steps: int, workers: int,
                 tiny: bool) -> dict[str, Any]:
    cfg = dict(base)
    if tiny:
        cfg["batch_size"] = min(int(cfg["batch_size"]), 2)
        cfg["accumulate"] = 1
    cfg.update(device=device, amp=precision != "fp32", epochs=1, max_steps=steps, num_workers=workers, log_every=1)
    if precision != "fp32":
        cfg["amp_dtype"] = precision
    return cfg


def count_flops(model_factory: Callable[[], torch.nn.Module], cfg: dict[str, Any], shape: tuple[int, ...],
                monitor: str, work: Path) -> dict[str, Any]:
    """One fit in the cost probe's mode (what ``make cost`` records): FLOPs and seconds of a batch."""
    from chestssl.train import cost_probe
    from chestssl.train.loop import fit

    log = work / "cost.jsonl"
    os.environ[cost_probe.LOG_ENV] = str(log)
    os.environ[cost_probe.BATCHES_ENV] = "1"
    try:
        batch = int(cfg["batch_size"])
        fit(model_factory(), SyntheticItems(2 * batch, shape), SyntheticItems(batch, shape, seed=1),
            {**cfg, "num_workers": 0}, work / "cost_live", work / "cost_ckpt.pt", seed=0, monitor=monitor)
    finally:
        os.environ.pop(cost_probe.LOG_ENV, None)
        os.environ.pop(cost_probe.BATCHES_ENV, None)
    record = json.loads(log.read_text().splitlines()[-1])
    log.unlink()
    return record


def logged_losses(live_dir: Path) -> list[float]:
    path = live_dir / "plots" / "metrics" / "train" / "loss.tsv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle, delimiter="\t")]


#: The entry of :data:`chestssl.cost.GPUS` for the GPU measured here (an H200 has an H100 SXM's peaks).
COST_GPU = "H100-SXM"


def cost_assumptions() -> tuple[float, str, dict[str, dict[str, float]]]:
    """:mod:`chestssl.cost`'s default utilisation (the fraction of peak its GPU-hours assume),
    its default GPU (that of ``reports/cost.md``) and its peaks by GPU and precision."""
    from chestssl import cost

    defaults = inspect.signature(cost.estimate).parameters
    return float(defaults["utilisation"].default), str(defaults["gpu"].default), dict(cost.GPUS)


def run_one(name: str, precision: str, params: dict[str, Any], args: argparse.Namespace, work: Path,
            flops_cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from chestssl.train.loop import fit

    device = torch.device(args.device)
    model, base_cfg, shape, monitor = build_model(name, params)
    accumulate = 1 if args.tiny else int(base_cfg.get("accumulate", 1))
    warmup, steps = args.warmup, args.steps
    if (warmup + steps) * accumulate > args.max_batches:  # e.g. the 3D DAE's 8 batches a step
        warmup, steps = 1, max(1, args.max_batches // accumulate - 1)
    cfg = train_config(base_cfg, precision, args.device, warmup + steps, args.workers, args.tiny)
    batch = int(cfg["batch_size"])
    row: dict[str, Any] = {
        "model": name, "class": type(model).__name__, "precision": precision, "device": device.type,
        "input": "x".join(map(str, (batch, 1, *shape))), "batch_size": batch, "accumulate": accumulate,
        "profile_amp": bool(base_cfg["amp"]), "profile_amp_dtype": base_cfg.get("amp_dtype", "fp16"),
        "parameters": sum(p.numel() for p in model.parameters()), "warmup_steps": warmup, "timed_steps": steps,
    }
    if name not in flops_cache:
        flops_cache[name] = count_flops(lambda: build_model(name, params)[0], {**cfg, "amp": False}, shape,
                                        monitor, work / f"{name}-flops")
    probe = flops_cache[name]
    flops_per_step = probe["flops_per_batch"] * accumulate
    row.update(flops_per_batch=probe["flops_per_batch"], flops_per_step=flops_per_step,
               probe_seconds_per_batch_fp32=probe["seconds_per_batch"])

    train_items = batch * accumulate * (warmup + steps)
    live = work / f"{name}-{precision}" / "live"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    finite, error = True, None
    with StepClock(device) as clock:
        started = time.perf_counter()
        try:
            result = fit(model, SyntheticItems(train_items, shape), SyntheticItems(batch, shape, seed=1), cfg, live,
                         work / f"{name}-{precision}" / "ckpt.pt", seed=0, monitor=monitor)
            row.update(steps_done=result.steps, peak_memory_gb=result.peak_memory_bytes / 1e9,
                       memory_kind=result.memory_kind)
        except FloatingPointError as exc:  # the loop stops on a non-finite loss
            finite, error = False, str(exc).splitlines()[0]
        except torch.OutOfMemoryError as exc:
            error = f"out of memory: {str(exc).splitlines()[0]}"
        row["fit_seconds"] = time.perf_counter() - started
    losses = logged_losses(work / f"{name}-{precision}" / "ckpt.live") or logged_losses(live)
    row.update(losses_logged=len(losses), losses_finite=finite and all(math.isfinite(v) for v in losses),
               first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
    if clock.scales:  # a skipped step halves the scale (from GradScaler's initial 2^16)
        row["fp16_skipped_steps"] = sum(b < a for a, b in zip([2.0**16] + clock.scales, clock.scales))
        row["fp16_final_scale"] = clock.scales[-1]
    if error:
        row["error"] = error
    durations = [b - a for a, b in zip(clock.stamps[warmup - 1:], clock.stamps[warmup:])] if warmup >= 1 else []
    if durations:
        seconds = sum(durations) / len(durations)
        utilisation, default_gpu, peaks = cost_assumptions()
        # chestssl.cost: gpu_seconds_per_step = flops_per_step / (peak[precision] * utilisation)
        estimate = flops_per_step / (peaks[COST_GPU][precision] * utilisation)
        row.update(seconds_per_step=seconds, seconds_per_step_min=min(durations),
                   tflops_achieved=flops_per_step / seconds / 1e12,
                   share_of_peak=flops_per_step / seconds / PEAKS[precision],
                   cost_gpu=COST_GPU, cost_utilisation=utilisation, cost_seconds_per_step=estimate,
                   measured_over_cost=seconds / estimate,
                   cost_default_gpu=default_gpu,
                   cost_default_gpu_seconds_per_step=flops_per_step / (peaks[default_gpu][precision] * utilisation))
        if precision == "fp32":
            row["share_of_tf32_peak"] = flops_per_step / seconds / PEAK_TF32
    del model
    return row


# ----------------------------------------------------------------------------- report


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'model':<24} {'prec':<5} {'input':<18} {'acc':>3} {'s/step':>8} {'cost s/step':>11} "
              f"{'meas/cost':>9} {'TFLOP/s':>8} {'%peak':>6} {'peak GB':>8} {'finite':>6}  note")
    print(header)
    print("-" * len(header))
    for row in rows:
        def num(key: str, fmt: str) -> str:
            value = row.get(key)
            return format(value, fmt) if isinstance(value, (int, float)) else "-"

        note = row.get("error", "")
        if "fp16_skipped_steps" in row:
            note = (note + " " if note else "") + f"fp16 skipped {row['fp16_skipped_steps']}"
        print(f"{row['model']:<24} {row['precision']:<5} {row['input']:<18} {row['accumulate']:>3} "
              f"{num('seconds_per_step', '8.3f')} {num('cost_seconds_per_step', '11.4f')} "
              f"{num('measured_over_cost', '9.2f')} {num('tflops_achieved', '8.1f')} "
              f"{num('share_of_peak', '6.1%') if 'share_of_peak' in row else '-':>6} "
              f"{num('peak_memory_gb', '8.2f')} {str(row['losses_finite']):>6}  {note}", flush=True)


def write_results(out: Path | None, environment: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": environment, "peaks": {**PEAKS, "tf32": PEAK_TF32}, "rows": rows},
                              indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed optimisation steps after the warm-up (default 5; --tiny: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimisation steps first (default 2; --tiny: 1)")
    parser.add_argument("--max-batches", type=int, default=24,
                        help="at most this many batches per fit: a model accumulating more gets 1 warm-up step "
                             "and fewer timed ones")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 4 on cuda, 0 on cpu)")
    parser.add_argument("--tiny", action="store_true", help="default params' sizes, batches of 2 (a CPU check)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (after every fit)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="after the loop's set_determinism, let cuDNN pick its fastest (non-deterministic) "
                             "algorithms: what determinism costs on a GPU")
    args = parser.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (1 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    args.workers = args.workers if args.workers is not None else (4 if args.device == "cuda" else 0)
    models = [m for m in args.models.split(",") if m]
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [m for m in models if m not in MODELS] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown model or precision: {', '.join(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible to PyTorch")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.cudnn_benchmark:
        from chestssl.train import loop

        seeded = loop.set_determinism

        def fastest_cudnn(*a, **k):
            seeded(*a, **k)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True

        loop.set_determinism = fastest_cudnn

    environment = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
                   "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                   "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                   "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                   "cudnn": "benchmark, non-deterministic" if args.cudnn_benchmark else "deterministic (the loop's)",
                   "profile": "params.yaml (tiny)" if args.tiny else f"params.yaml + {PROFILE.name}"}
    print(json.dumps(environment), flush=True)
    params = load_params(args.tiny)
    rows: list[dict[str, Any]] = []
    flops_cache: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-training-") as tmp:
        previous = Path.cwd()
        os.chdir(tmp)  # dvclive finds no DVC repository here
        try:
            for name in models:
                for precision in precisions:
                    print(f"== {name} {precision}", file=sys.stderr, flush=True)
                    try:
                        row = run_one(name, precision, params, args, Path(tmp), flops_cache)
                    except Exception as exc:  # one model's failure does not stop the others
                        traceback.print_exc()
                        row = {"model": name, "precision": precision, "input": "-", "accumulate": "-",
                               "losses_finite": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
                    rows.append(row)
                    write_results(args.out, environment, rows)  # so far: a run cut short keeps its rows
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
        finally:
            os.chdir(previous)
    print()
    print_table(rows)
    utilisation, default_gpu, _ = cost_assumptions()
    print(f"\ncost s/step: chestssl.cost's estimate for the same FLOPs (FlopCounterMode) on {COST_GPU} at its "
          f"default {utilisation:.0%} of the precision's peak (fp32 at the {PEAK_FP32 / 1e12:g} TFLOP/s fp32 peak; "
          f"reports/cost.md assumes {default_gpu}). meas/cost < 1: faster than the cost table assumes. "
          f"%peak: of {PEAK_BF16 / 1e12:g} TFLOP/s (bf16/fp16) or {PEAK_FP32 / 1e12:g} (fp32; TF32: "
          f"{PEAK_TF32 / 1e12:g}). Total {time.perf_counter() - started:.0f} s.")
    if args.out is not None:
        write_results(args.out, environment, rows)
        print(f"wrote {args.out}")
    return 1 if any(r.get("error") or r.get("losses_finite") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
