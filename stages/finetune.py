"""finetune@<run>: a downstream task (nodule segmentation or classification) from a pretrained encoder."""

from __future__ import annotations

from chestssl import paths
from chestssl.cli import entry_from_argv, flat_metrics, run_stage
from chestssl.io import write_json
from chestssl.model_files import load_model_file, save_model_file
from chestssl.params import load_params

# The validation metric that picks the best epoch of each task.
MONITOR = {"seg": ("val/dice", "max"), "cls": ("val/loss", "min")}


def main(argv: list[str]) -> None:
    from chestssl.data.datasets import SliceDataset
    from chestssl.tasks import build_task
    from chestssl.train.checkpoint import stage_inputs
    from chestssl.train.loop import fit

    params = load_params()
    name, run = entry_from_argv(argv, params, "runs")
    seed, slices = params["seed"], params["slices"]
    encoder_file = paths.encoder_path(run["init"])
    encoder = load_model_file(encoder_file, paths.pretrain_stage(run["init"], params))
    model = build_task(run, encoder, seed, name=name)

    def data(split: str) -> SliceDataset:
        return SliceDataset(paths.PROCESSED_DIR, split, slices["size"], run["task"],
                            clean_per_nodule_slice=slices["clean_per_nodule_slice"], seed=seed)

    monitor, mode = MONITOR[run["task"]]
    report_dir = paths.finetune_report_dir(name)
    inputs = stage_inputs({"run": run, "slices": slices}, [paths.PROCESSED_DIR, encoder_file])
    result = fit(model, data("train"), data("val"), run["train"], report_dir / "live",
                 paths.checkpoint_path("finetune", name), seed, monitor=monitor, mode=mode, inputs=inputs)
    if not result.is_main:  # under torchrun, rank 0 writes the outputs
        return
    save_model_file(paths.finetune_model_path(name),
                    {"run": name, "config": run, "encoder": encoder, "state_dict": result.best_state})
    metrics = {"epochs": result.epochs, "steps": result.steps, f"best_{monitor.replace('/', '_')}": result.best_value,
               **flat_metrics(result.final_metrics)}
    write_json(report_dir / "metrics.json", metrics)
    print(f"finetune@{name}: {metrics}")


if __name__ == "__main__":
    run_stage(main)
