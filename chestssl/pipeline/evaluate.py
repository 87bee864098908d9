"""Stage ``evaluate@<run>``: test-split metrics of a fine-tuned model, with bootstrap CIs over patients.

The run's model (stage ``finetune@<run>``) predicts every test slice
(:func:`chestssl.eval.downstream.evaluate_predictor`): Dice / Jaccard (global and per
image) or accuracy, precision, recall, F1, AUROC, with intervals over patients; example
slices for the figures; per-slice scores for paired comparisons. A classifier's example
slices also get their Grad-CAM maps (:func:`chestssl.interpret.add_gradcam_to_examples`).
With ``training_seeds`` above 1, the models of the other training seeds are scored on the
same test slices and ``metrics.json`` gets their spread under ``training_seeds``
(:func:`chestssl.eval.downstream.spread_over_training_seeds`); intervals, examples and
per-slice scores stay those of the first seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl import paths
from chestssl.io import write_json
from chestssl.model_files import load_model_file
from chestssl.params import ParamsError, training_seed_values


def evaluate(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path = paths.PROCESSED_DIR,
    model_path: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the fine-tuned run ``name`` on the test split; write its metrics, examples and items.

    Args:
        params: the loaded params (the run, ``seed``, ``slices``, ``evaluate``,
            ``evaluate.num_examples``).
        name: an entry under ``runs``.
        processed_dir: ``data/processed``.
        model_path: the fine-tuned model; default :func:`chestssl.paths.finetune_model_path`.
        out_dir: receives ``metrics.json``, ``examples.npz`` and ``items.npz``; default
            :func:`chestssl.paths.evaluate_dir`.

    Returns the metrics.
    """
    from chestssl.data.datasets import SliceDataset, slice_options
    from chestssl.eval.downstream import evaluate_predictor, score_predictions, spread_over_training_seeds
    from chestssl.inference import auto_device, predict_dataset
    from chestssl.interpret import add_gradcam_to_examples

    if name not in params["runs"]:
        raise ParamsError([f"runs: {name!r} is not an entry ({', '.join(params['runs']) or 'none'})"])
    run = params["runs"][name]
    seed, slices = params["seed"], params["slices"]
    model_path = Path(model_path) if model_path is not None else paths.finetune_model_path(name)
    out_dir = Path(out_dir) if out_dir is not None else paths.evaluate_dir(name)
    device = auto_device()
    model = load_run_model(run, name, model_path, seed, device)
    test = SliceDataset(processed_dir, "test", task=run["task"], seed=seed, **slice_options(slices))
    metrics = evaluate_predictor(
        run["task"], model.predict, test, params["evaluate"], examples_path=out_dir / "examples.npz",
        items_path=out_dir / "items.npz", num_examples=params["evaluate"]["num_examples"], seed=seed, device=device,
        feature_maps=getattr(model, "encoder_feature_maps", None),
    )
    if run["task"] == "cls":
        # Grad-CAM of the nodule logit on the saved example slices, for the report's figure.
        add_gradcam_to_examples(model, out_dir / "examples.npz")
    seeds = training_seed_values(params)
    if len(seeds) > 1:
        # The other training seeds' models on the same test slices: their spread is the variation
        # between training runs, which the patient bootstrap above does not contain.
        by_seed = {seed: metrics}
        for training_seed in seeds[1:]:
            other = load_run_model(run, name, paths.seed_model_path(model_path, training_seed), training_seed, device)
            out = predict_dataset(other.predict, test, device=device)
            by_seed[training_seed] = score_predictions(run["task"], out, params["evaluate"], seed=seed)
        metrics["training_seeds"] = spread_over_training_seeds(by_seed)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def load_run_model(run: Mapping[str, Any], name: str, model_path: Path, seed: int, device: Any) -> Any:
    """The fine-tuned model of ``runs.<name>`` in ``model_path``, on ``device``, in eval mode."""
    from chestssl.tasks import build_task

    saved = load_model_file(model_path, f"finetune@{name}", required=("encoder", "state_dict"))
    model = build_task(_with_recorded_weights(run, saved, name, model_path), saved["encoder"], seed, name=name)
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()


def _with_recorded_weights(run: Mapping[str, Any], saved: Mapping[str, Any], name: str,
                           model_path: Path) -> Mapping[str, Any]:
    """``run`` with ``class_weights: balanced`` replaced by the weights finetune computed from
    its training set and recorded in the model file (:func:`chestssl.pipeline.finetune.class_weighting`)."""
    from chestssl.model_files import ModelFileError
    from chestssl.params import BALANCED
    from chestssl.tasks.cls import CLASSES

    if run.get("task") != "cls" or run.get("class_weights") != BALANCED:
        return run
    recorded = saved.get("class_weights")
    if not isinstance(recorded, Mapping) or set(recorded) != set(CLASSES):
        raise ModelFileError(f"{model_path}: no class_weights recorded for runs.{name}.class_weights: {BALANCED!r}; "
                             f"rerun `dvc repro finetune@{name}`")
    return {**run, "class_weights": [float(recorded[c]) for c in CLASSES]}
