"""Train and test one downstream run under several settings, resuming after an interruption.

An ablation (seed 001's label fraction or frozen parts) repeats a fine-tuning run (same
task, architecture, pretrained encoder and training params) under settings that change
one thing: the training patients or training images (:mod:`chestssl.ablations.label_fraction`)
or the parts that train (:mod:`chestssl.ablations.parts`). The run is an
:class:`AblationSubject`: a ``runs`` entry on CT slices (:func:`run_subject`) or a
``radiograph_runs`` entry (:mod:`chestssl.ablations.radiographs`). Each setting is trained
with the same loop as the run's own stage (best epoch on the validation split) and scored
on the test split with patient-bootstrap intervals, as the run itself is scored.

A finished setting's result is kept in a state folder (the stages use
``checkpoints/<ablation>/<run>/``) as ``<key>.json`` with a fingerprint of everything it
depends on, its training curves as ``live/<key>``, and the loop keeps its own resume
checkpoint ``<key>.pt`` (and the curves so far) there mid-setting, so an interrupted
ablation resumes where it stopped, its earlier curves included. The curves of every
setting are copied to the ablation's ``live`` output when all settings are done; the
folder is removed when the whole ablation has finished (:func:`finish_ablation`).

Each result keeps what its fit cost (:func:`~chestssl.train.cost_probe.fit_cost`), so a
reused setting still reports its cost; :func:`ablation_costs` gathers them into the
stage's ``cost.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from chestssl.io import atomic_dir, write_json

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from chestssl.data.datasets import SliceDataset

#: The validation metric that picks the best epoch of each task (as in ``finetune``).
MONITOR = {"seg": ("val/dice", "max"), "cls": ("val/loss", "min")}


@dataclass(frozen=True)
class AblationSetting:
    """One setting of an ablation.

    Attributes:
        key: file-safe name of the setting (``25pct``, ``unfrozen_2``).
        patient_ids: training patients; ``None``: the whole train split.
        unfrozen_stages: encoder stages trained with the head (deepest first); ``None``:
            the whole network trains, as in ``finetune``.
        item_indices: training items, as positions among the items of the whole train
            split for the run's task (:func:`run_dataset`); ``None``: every item of the
            patients above. Names a subset of images rather than of patients, so it
            excludes ``patient_ids``.
    """

    key: str
    patient_ids: tuple[str, ...] | None = None
    unfrozen_stages: int | None = None
    item_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.item_indices is not None:
            if self.patient_ids is not None:
                raise ValueError(f"setting {self.key!r}: name training patients or training items, not both")
            if len(self.item_indices) == 0:
                raise ValueError(f"setting {self.key!r}: item_indices is empty; a setting trains on at least one item")


class TrainingItems:
    """The items of ``items`` at ``indices`` (in that order), with their rows of ``items.frame``:
    a map-style dataset, as :func:`chestssl.train.loop.fit` takes."""

    def __init__(self, items: "SliceDataset", indices: Sequence[int]) -> None:
        self.items, self.indices = items, [int(i) for i in indices]
        outside = [i for i in self.indices if not 0 <= i < len(items)]
        if outside:
            raise IndexError(f"item indices {outside[:10]} outside the {len(items)} training items; "
                             "the processed data changed since the subsets were drawn")
        self.frame = items.frame.iloc[self.indices].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[self.indices[index]]


def items_digest(frame) -> str:
    """Digest of which slices a training set holds (scan, slice index and label of each item, in order)."""
    from chestssl.train.checkpoint import digest

    return digest([[str(scan), int(index), int(label)] for scan, index, label
                   in zip(frame["scan_id"], frame["slice_index"], frame["label"])])


def setting_fingerprint(setting: AblationSetting, common: Mapping[str, Any], items: str | None = None) -> str:
    """What a finished setting's result depends on: the setting, ``common`` (seed, evaluation
    params, stage inputs) and, for a setting of items, :func:`items_digest` of its training set.

    A setting that names no items is fingerprinted as before items could be named, so
    results kept for patient and frozen-parts settings stay valid.
    """
    from chestssl.train.checkpoint import digest

    fields = asdict(setting)
    if fields["item_indices"] is None:
        del fields["item_indices"]
    else:
        fields["training_items"] = items
    return digest(dict(setting=fields, **common))


def interval_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The ``{value, ci_low, ci_high[, note]}`` entries of an evaluation, plus its image/patient counts."""
    kept: dict[str, Any] = {key: dict(value) for key, value in metrics.items()
                            if isinstance(value, Mapping) and {"value", "ci_low", "ci_high"} <= set(value)}
    for key in ("n_images", "n_patients", "confusion_matrix", "threshold"):
        if key in metrics:
            kept[key] = metrics[key]
    return kept


def test_metrics(task: str, predict, dataset, evaluate_cfg: Mapping[str, Any], seed: int, device) -> dict[str, Any]:
    """Test-split metrics of ``predict`` with patient-bootstrap intervals (as ``evaluate`` computes them)."""
    from chestssl.eval.downstream import score_predictions
    from chestssl.inference import predict_dataset

    out = predict_dataset(predict, dataset, device=device)
    metrics = score_predictions(task, out, evaluate_cfg, seed=seed)
    return interval_metrics(metrics)


def run_encoder_payload(model_path: str | Path, run_name: str) -> dict[str, Any]:
    """The pretrained encoder payload the run's ``finetune`` stage started from, kept in its
    ``model.pt`` (``model_path``; the stage writes ``models/finetune/<run>/model.pt``)."""
    from chestssl.model_files import load_model_file

    return load_model_file(model_path, f"finetune@{run_name}", required=("encoder",))["encoder"]


def run_dataset(
    params: Mapping[str, Any], run_name: str, processed_dir: str | Path, split: str,
    patient_ids: Sequence[str] | None = None,
) -> "SliceDataset":
    """The items of ``split`` for the task of ``runs.<run_name>`` (all patients, or ``patient_ids``),
    sampled as ``finetune`` samples them (``slices`` params, ``seed``)."""
    from chestssl.data.datasets import SliceDataset, slice_options

    return SliceDataset(Path(processed_dir), split, task=params["runs"][run_name]["task"], seed=params["seed"],
                        patient_ids=list(patient_ids) if patient_ids is not None else None,
                        **slice_options(params["slices"]))


@dataclass(frozen=True)
class AblationSubject:
    """What an ablation repeats: one fine-tuning run's data, model, training and test.

    Attributes:
        name: the run (in messages).
        train_cfg: its ``train`` params (the loop's recipe).
        monitor: the validation metric that picks the best epoch, and ``min`` or ``max``.
        inputs: what the run's training reads (:func:`~chestssl.train.checkpoint.stage_inputs`),
            part of each result's fingerprint and of the loop's resume check.
        seed, evaluate: the ``seed`` and ``evaluate`` params.
        dataset: ``(split, patient_ids or None) -> dataset`` of the run's items (a map-style
            dataset with a ``frame`` of one row per item, ``patient_id`` among its columns).
        build: ``training dataset -> task model`` (a :class:`~chestssl.train.loop.TrainableModule`
            with ``predict``), seeded; class weights may come from the training items.
        test: ``(model, test dataset, device) -> metrics``: ``{value, ci_low, ci_high}``
            records with patient-bootstrap intervals, and the test counts.
        items_digest: ``frame -> str``, which items a training set holds (for settings
            that name items); ``None``: :func:`items_digest` (scan, slice and label of each).
    """

    name: str
    train_cfg: Mapping[str, Any]
    monitor: tuple[str, str]
    inputs: Mapping[str, Any]
    seed: int
    evaluate: Mapping[str, Any]
    dataset: Callable[[str, Sequence[str] | None], Any]
    build: Callable[[Any], Any]
    test: Callable[[Any, Any, Any], dict[str, Any]]
    items_digest: Callable[[Any], str] | None = None


def run_subject(
    params: Mapping[str, Any], run_name: str, encoder_payload: Mapping[str, Any], processed_dir: str | Path,
    model_path: str | Path,
) -> AblationSubject:
    """The :class:`AblationSubject` of ``runs.<run_name>`` on the processed CT slices: its items
    as ``finetune`` samples them (:func:`run_dataset`), its task model started from
    ``encoder_payload`` (:func:`run_encoder_payload`), and ``evaluate``'s test metrics."""
    from chestssl.tasks import build_task
    from chestssl.train.checkpoint import stage_inputs

    run, seed = params["runs"][run_name], params["seed"]
    processed_dir = Path(processed_dir)
    # The fine-tuned model file holds the pretrained encoder the run starts from.
    inputs = stage_inputs({"run": run, "slices": params["slices"]}, [processed_dir, model_path])

    def dataset(split: str, patient_ids: Sequence[str] | None = None):
        return run_dataset(params, run_name, processed_dir, split, patient_ids)

    def build(train):
        # `class_weights: balanced` is computed from this setting's own training items.
        return build_task(run, encoder_payload, seed, name=run_name, train_labels=train.frame["label"].to_numpy())

    def test(model, data, device):
        return test_metrics(run["task"], model.predict, data, params["evaluate"], seed, device)

    return AblationSubject(run_name, run["train"], MONITOR[run["task"]], inputs, seed, params["evaluate"],
                           dataset, build, test)


def run_ablation(
    ablation: str,
    run_name: str,
    params: Mapping[str, Any],
    encoder_payload: Mapping[str, Any],
    settings: Sequence[AblationSetting],
    *,
    processed_dir: str | Path,
    model_path: str | Path,
    report_dir: str | Path,
    state_dir: str | Path,
    train_items: "SliceDataset | None" = None,
) -> dict[str, dict[str, Any]]:
    """Train and test ``runs.<run_name>`` under each setting (:func:`run_subject`,
    :func:`run_subject_ablation`); returns ``{key: result}``.

    Args:
        ablation: its name in messages (``label_fraction``, ``frozen_parts``).
        run_name, params: the run and the loaded params (``runs``, ``seed``, ``slices``,
            ``evaluate``).
        encoder_payload: :func:`run_encoder_payload` of the run.
        settings: the trainings.
        processed_dir: ``data/processed``.
        model_path: the run's fine-tuned ``model.pt`` (it holds the encoder the run starts
            from; part of the resume fingerprint).
        report_dir, state_dir, train_items: see :func:`run_subject_ablation`.
    """
    subject = run_subject(params, run_name, encoder_payload, processed_dir, model_path)
    return run_subject_ablation(ablation, subject, settings, report_dir=report_dir, state_dir=state_dir,
                                train_items=train_items)


def run_subject_ablation(
    ablation: str,
    subject: AblationSubject,
    settings: Sequence[AblationSetting],
    *,
    report_dir: str | Path,
    state_dir: str | Path,
    train_items: Any = None,
) -> dict[str, dict[str, Any]]:
    """Train and test ``subject`` under each setting; returns ``{key: result}``.

    Args:
        ablation: its name in messages (``label_fraction``, ``frozen_parts``, ...).
        subject: the run repeated (:class:`AblationSubject`).
        settings: the trainings.
        report_dir: training curves go to ``report_dir/live/<key>`` (the whole folder
            written when every setting is done).
        state_dir: finished settings' results and curves, and the loop's resume checkpoint.
        train_items: ``subject.dataset("train")``, which the ``item_indices`` of settings
            index (built here when a setting names items and it is not given).

    Each result holds the training-set size, the best epoch, the test metrics (``test``)
    and what the fit cost (``cost``, :func:`~chestssl.train.cost_probe.fit_cost`). Returns an
    empty dict on ranks other than 0 of a distributed run.
    """
    from chestssl.ablations.parts import PartlyFrozenTask
    from chestssl.inference import auto_device
    from chestssl.train.cost_probe import fit_cost
    from chestssl.train.loop import fit

    report_dir, state_dir = Path(report_dir), Path(state_dir)
    monitor, mode = subject.monitor
    inputs = dict(subject.inputs)
    common = dict(seed=subject.seed, evaluate=subject.evaluate, inputs=inputs)
    val, test = subject.dataset("val", None), subject.dataset("test", None)
    if train_items is None and any(setting.item_indices is not None for setting in settings):
        train_items = subject.dataset("train", None)
    results: dict[str, dict[str, Any]] = {}
    for setting in settings:
        result_path = state_dir / f"{setting.key}.json"
        chosen = None if setting.item_indices is None else TrainingItems(train_items, setting.item_indices)
        chosen_digest = None if chosen is None else (subject.items_digest or items_digest)(chosen.frame)
        fingerprint = setting_fingerprint(setting, common, chosen_digest)
        if result_path.exists():
            earlier = json.loads(result_path.read_text())
            # A result kept without its cost (written before costs were kept) is trained again.
            if earlier.get("fingerprint") == fingerprint and "cost" in earlier:
                log.info("%s@%s: %s already done, result reused from %s", ablation, subject.name, setting.key,
                         result_path)
                results[setting.key] = earlier
                continue
        train = chosen if chosen is not None else subject.dataset("train", setting.patient_ids)
        model = subject.build(train)
        if setting.unfrozen_stages is not None:
            model = PartlyFrozenTask(model, setting.unfrozen_stages)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        fitted = fit(model, train, val, subject.train_cfg, state_dir / "live" / setting.key,
                     state_dir / f"{setting.key}.pt", subject.seed, monitor=monitor, mode=mode,
                     inputs={**inputs, "setting": setting.key,
                             **({"training items": chosen_digest} if chosen_digest is not None else {})})
        if not fitted.is_main:
            continue
        model.load_state_dict(fitted.best_state)
        cost = fit_cost(model, fitted)
        device = auto_device()
        model.to(device).eval()
        result = {
            "fingerprint": fingerprint,
            "n_train_images": len(train),
            "n_train_patients": int(len(np.unique(train.frame["patient_id"]))),
            "trainable_parameters": int(trainable),
            "epochs": fitted.epochs,
            "best_epoch": fitted.best_epoch,
            f"best_{monitor.replace('/', '_')}": fitted.best_value,
            "test": subject.test(model, test, device),
            "cost": cost,
        }
        write_json(result_path, result)
        results[setting.key] = result
        log.info("%s@%s: %s done (%d training images)", ablation, subject.name, setting.key, len(train))
    if len(results) == len(settings):
        with atomic_dir(report_dir / "live") as staging:
            for setting in settings:
                curves = state_dir / "live" / setting.key
                if curves.is_dir():
                    shutil.copytree(curves, staging / setting.key)
    return results


def ablation_costs(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """An ablation stage's ``cost.json``: ``{"fits": {<setting key>: <its cost>}}``, one record
    per fit in the keys of :func:`~chestssl.train.cost_probe.fit_cost` (the report shows each
    beside that fit's scores)."""
    return {"fits": {key: dict(result["cost"]) for key, result in results.items()}}


def finish_ablation(state_dir: str | Path) -> None:
    """Remove the per-setting results kept for resuming (``state_dir`` of
    :func:`run_ablation`), once the ablation's metrics are written."""
    shutil.rmtree(state_dir, ignore_errors=True)
