"""What gradient checkpointing (``use_checkpoint`` of a Swin backbone) saves and costs.

For each setting, one SwinUNETR 3D built from a seeded :class:`chestssl.models.swin.SwinEncoder`
(as ``finetune_3d@`` builds it) takes ``--steps`` AdamW steps on random crops, once without
and once with checkpointing, on the same data. Printed per setting: the loss after the last
step of each (they must agree: checkpointing recomputes the same arithmetic), seconds per step
and peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS
growth, measured in a fresh process per run), and the ratios with/without.

    python benchmarks/swin_checkpointing.py                        # CPU, the quick profile's size
    python benchmarks/swin_checkpointing.py --device cuda --amp bf16 --crop 96 --feature-size 48

Results are printed and written atomically to ``reports/benchmarks/swin_checkpointing_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def one_run(device: str, amp: str, crop: int, feature_size: int, batch: int, steps: int,
            use_checkpoint: bool) -> dict[str, Any]:
    """Train ``steps`` steps in this process; loss, seconds per step (after the first) and peak memory."""
    import resource

    import torch

    from chestssl.models.seeding import seeded
    from chestssl.models.swin import SwinEncoder, swin_unetr_from_encoder

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with seeded(0):
        encoder = SwinEncoder(3, feature_size=feature_size, use_checkpoint=use_checkpoint)
    network = swin_unetr_from_encoder(encoder, out_channels=2, seed=1).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(batch, 1, crop, crop, crop, generator=generator).to(device)
    y = (torch.rand(batch, 1, crop, crop, crop, generator=generator) > 0.9).long().to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            logits = network(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y[:, 0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_gb = (torch.cuda.max_memory_allocated() if device == "cuda"
               else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024) / 1e9
    return {"use_checkpoint": use_checkpoint, "loss": float(loss), "s_per_step": sum(times[1:]) / max(len(times) - 1, 1),
            "peak_gb": round(peak_gb, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--feature-size", type=int, default=12)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--use-checkpoint", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.child:  # one measurement, in a fresh process so that peak RSS is its own
        print(json.dumps(one_run(args.device, args.amp, args.crop, args.feature_size, args.batch[0], args.steps,
                                 args.use_checkpoint)))
        return {}
    rows = []
    for batch in args.batch:
        pair = []
        for use_checkpoint in (False, True):
            command = [sys.executable, __file__, "--child", "--device", args.device, "--amp", args.amp,
                       "--crop", str(args.crop), "--feature-size", str(args.feature_size), "--batch", str(batch),
                       "--steps", str(args.steps), *(["--use-checkpoint"] if use_checkpoint else [])]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            pair.append(json.loads(done.stdout.strip().splitlines()[-1]))
        off, on = pair
        row = {"batch": batch, "without": off, "with": on,
               "memory_ratio": round(on["peak_gb"] / off["peak_gb"], 3),
               "time_ratio": round(on["s_per_step"] / off["s_per_step"], 3),
               "loss_abs_difference": abs(on["loss"] - off["loss"])}
        rows.append(row)
        print(f"batch {batch} x 1 x {args.crop}^3, feature size {args.feature_size}, {args.device}, amp {args.amp}: "
              f"peak {off['peak_gb']:.2f} -> {on['peak_gb']:.2f} GB (x{row['memory_ratio']}), "
              f"{off['s_per_step']:.3f} -> {on['s_per_step']:.3f} s/step (x{row['time_ratio']}), "
              f"loss {off['loss']:.6f} vs {on['loss']:.6f}")
    import torch

    result = {"machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
                         f"torch {torch.__version__}"
                         + (f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""),
              "device": args.device, "amp": args.amp, "crop": args.crop, "feature_size": args.feature_size,
              "steps": args.steps, "rows": rows}
    from chestssl.io import write_text

    write_text(args.out or REPO / "reports" / "benchmarks" / f"swin_checkpointing_{args.device}.json",
               json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
