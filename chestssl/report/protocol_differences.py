"""Where the protocol of the params in force differs from the five seed systems' protocols.

The report quotes the seeds' published numbers beside ours; this module lists, point by
point, how the protocol that produced our numbers differs from the seed's, so that a reader
never takes one for the other. Every row is computed from the validated params (the
mapping :func:`chestssl.params.load_params` returns, entries with their presets filled
in): where a key decides whether we match (e.g. the DAE recipe's ``warmup_epochs`` and
``min_lr``, a 2D DAE entry's ``epoch_unit``), ``matches`` and the text of our side follow
it; where we differ by design (e.g. the patient-level split), the row says so and why. A
point that does not apply to the params (no 3D DAE entry, no autoencoder entry, ...)
gives no row.

The seeds' numbers are those of ``seeds/DIGEST.md`` and the seeds' READMEs:

- 000, multi-task chest CT autoencoder: LIDC-IDRI, 128 x 128 slices, an 8:1:1 split of
  slices, L1 + LPIPS (VGG) + codebook + PatchGAN autoencoder loss, a ResNet on the
  autoencoder's latent with cross-entropy weights [50, 1] (clean, nodule);
- 001, Barlow Twins for chest X-ray: CheXpert frontal images (60 epochs, batch 128) and
  COVID-19 Radiography; label fractions of the training images;
- 002, STN alignment: ChestX-ray14;
- 003, Disruptive Autoencoders: random 96^3 crops of CT windowed to -1000..1000 HU, AdamW
  1e-4, warm-up 4 epochs then cosine to 1e-5, 8 GPUs x batch 2, 300 epochs (1000 for
  ``all``), fp32 (AMP made its contrastive loss NaN), CT of five collections plus MRI;
- 004, RadDiffusion: MIMIC-CXR studies, ViT on 256 px with patch 32, AdamW 1.4e-4, 5%
  warm-up then cosine, 200 epochs at batch 512 studies.

Reads no tensor library: the report stage stays a pure reader of params and metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import pandas as pd

from chestssl.params import DEFAULT_EPOCH_UNIT, process_count, radiograph_entry, train_setting, training_seed_values
from chestssl.report.tables import Table

#: Name and title of the table (``tables/protocol_differences.{csv,md}``).
TABLE_NAME = "protocol_differences"
TABLE_TITLE = "Differences from the seeds' protocols"
#: The table's columns: CSV name -> Markdown header.
COLUMNS = {"seed": "Seed", "topic": "What", "seed_protocol": "The seed's protocol", "ours": "Ours",
           "matches": "Same?"}

#: The seeds' published settings the rows compare with (seeds/DIGEST.md).
SEED000_SLICE_SIZE = 128
SEED000_CLS_WEIGHTS = (50.0, 1.0)  # (clean, nodule)
SEED001_RADIOGRAPH_TRAIN = {"epochs": 60, "global_batch": 128}  # CheXpert
SEED001_LABEL_FRACTIONS = (0.01, 0.05, 0.10, 0.15, 0.20, 0.25, 0.50, 1.0)  # of the training images, nested
SEED003_SCHEDULE = {"optimizer": "adamw", "lr": 1e-4, "warmup_epochs": 4.0, "min_lr": 1e-5}
SEED003_EPOCHS = {"all": 1000}  # every other disruption: 300
SEED003_DEFAULT_EPOCHS = 300
SEED003_GLOBAL_BATCH = 16  # 8 GPUs x 2
SEED003_HU_WINDOW = (-1000.0, 1000.0)
SEED003_CROP_SIZE = 96  # a new random 96^3 crop of each volume every epoch
SEED004_SCHEDULE = {"optimizer": "adamw", "lr": 1.4e-4, "warmup_share": 0.05}
SEED004_RADIOGRAPH_TRAIN = {"epochs": 200, "global_batch": 512}  # studies
SEED004_VIT = {"img_size": 256, "patch_size": 32}

#: Real chest X-ray datasets by ``data.cxr.source``.
CXR_NAMES = {"chexpert": "CheXpert", "chestxray14": "ChestX-ray14", "covid_radiography": "COVID-19 Radiography",
             "mimic_cxr": "MIMIC-CXR"}
#: Pretext methods (the ``method`` key) that are seed 000's autoencoders.
AUTOENCODER_METHODS = ("vqgan", "ae", "multihead")
#: ``runs.<run>.arch`` values that put seed 000's ResNet on the encoder's latent.
LATENT_RESNET_ARCHS = ("resnet18", "resnet50")


@dataclass(frozen=True)
class Difference:
    """One point of the protocol: the seed's side, ours, and whether they are the same.

    ``seed``: ``"000"`` ... ``"004"``, or ``"all"`` for a point every seed shares.
    ``topic``: what is compared, a few words. ``seed_protocol`` and ``ours``: one sentence
    each. ``matches``: True when the params in force follow the seed on this point.
    """

    seed: str
    topic: str
    seed_protocol: str
    ours: str
    matches: bool


# ---------------------------------------------------------------- helpers

def _g(value: float) -> str:
    return f"{float(value):g}"


def _names(names: Iterable[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _grouped(by_name: Mapping[str, str]) -> str:
    """``text`` when every entry has the same text, else ``text (`a`, `b`); other (`c`)``."""
    groups: dict[str, list[str]] = {}
    for name, text in by_name.items():
        groups.setdefault(text, []).append(name)
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{text} ({_names(names)})" for text, names in groups.items())


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _global_batch(train: Mapping[str, Any], params: Mapping[str, Any]) -> int:
    """Items per optimisation step: ``batch_size x accumulate x nproc_per_node x nnodes``."""
    return int(train["batch_size"]) * int(train_setting(train, "accumulate")) * process_count(params["launch"])


def _entries(params: Mapping[str, Any], kinds: Iterable[str], sections: Iterable[str] = ("methods",)) -> dict:
    """The pretraining entries whose ``method`` is one of ``kinds``."""
    kinds = tuple(kinds)
    return {name: entry for section in sections for name, entry in (params.get(section) or {}).items()
            if isinstance(entry, Mapping) and entry.get("method") in kinds}


def _spatial_dims(entry: Mapping[str, Any]) -> int | None:
    backbone = entry.get("backbone")
    return backbone.get("spatial_dims") if isinstance(backbone, Mapping) else None


def _rate(value: float) -> str:
    """A learning rate as the seeds write it: ``1e-4``, ``1.4e-4``, ``0``."""
    if not value:
        return "0"
    mantissa, exponent = f"{float(value):.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _schedule(train: Mapping[str, Any], share: bool = False) -> str:
    """``AdamW 1e-4, warm-up 4 epochs from near 0, then cosine to 1e-5``; with ``share``,
    the warm-up is also given as a share of the epochs (``warm-up 10 of 200 epochs (5%)``)."""
    optimizer = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}.get(train["optimizer"], train["optimizer"])
    warmup = float(train_setting(train, "warmup_epochs"))
    scheduler = train["scheduler"]
    after = {"cosine": f"cosine to {_rate(train_setting(train, 'min_lr'))}", "none": "constant",
             "plateau": "reduce-on-plateau"}.get(scheduler, scheduler)
    if not warmup:
        return f"{optimizer} {_rate(train['lr'])}, no warm-up, {after}"
    length = f"{_g(warmup)} of {train['epochs']} epochs ({warmup / train['epochs']:.0%})" if share else \
        f"{_g(warmup)} epochs"
    return f"{optimizer} {_rate(train['lr'])}, warm-up {length} from near 0, then {after}"


def _ct(params: Mapping[str, Any]) -> str:
    """A few words naming our CT."""
    return "synthetic phantom CT" if params["data"]["source"] == "phantom" else "LIDC-IDRI CT"


def _radiographs(params: Mapping[str, Any]) -> tuple[str, str]:
    """``(data.cxr.source, a few words naming our radiographs)``."""
    cxr = params["data"].get("cxr") or {}
    source = cxr.get("source", "rendered")
    if source == "rendered":
        views = " and ".join((params.get("pretrain_radiographs") or {}).get("views") or ["frontal", "lateral"])
        return source, f"radiographs rendered from our {_ct(params)} ({views}, one study per scan; " \
                       "`data.cxr.source: rendered`)"
    frontal = " (frontal only)" if cxr.get("frontal_only") else ""
    return source, f"{CXR_NAMES.get(source, source)}{frontal} (`data.cxr.source: {source}`)"


# ---------------------------------------------------------------- seed 000

def _seed000(params: Mapping[str, Any]) -> list[Difference]:
    """Seed 000 (multi-task chest CT autoencoder): CT data, slice size, split, perceptual
    loss, what the ResNet classifier reads, and the classifier's class balance."""
    rows = []
    data = params["data"]
    source = data["source"]
    if source == "phantom":
        phantom = data["phantom"]
        anatomy = ("one real chest CT deformed per patient, the radiologists' nodules inserted"
                   if phantom.get("anatomy", "geometric") == "ct" else "drawn anatomy")
        ours, same = (f"Synthetic phantom CT ({phantom['num_scans']} scans: {anatomy}) carrying real LIDC-IDRI "
                      "annotations (`data.source: phantom`), so no number is comparable."), False
    elif source in ("tcia", "idc"):
        block, where = data[source], {"tcia": "TCIA", "idc": "Imaging Data Commons"}[source]
        if block.get("patients"):
            ours, same = f"LIDC-IDRI from {where}, {len(block['patients'])} listed patients only.", False
        elif block.get("max_patients"):
            ours, same = f"LIDC-IDRI from {where}, the first {block['max_patients']} patients only.", False
        else:
            ours, same = f"LIDC-IDRI from {where}, all patients (`data.source: {source}`).", True
    else:
        ours, same = f"LIDC-IDRI CT (`data.source: {source}`).", True
    rows.append(Difference("000", "CT data", "Real LIDC-IDRI CT, all patients, read with pylidc.", ours, same))

    size = params["slices"]["side"]
    rows.append(Difference("000", "slice size", f"Axial slices resized to {SEED000_SLICE_SIZE} x {SEED000_SLICE_SIZE}.",
                           f"{size} x {size} slices (`slices.side`).", size == SEED000_SLICE_SIZE))
    view = params["slices"].get("field_of_view", "body")
    ours = {
        "lungs": "The box of each scan's lungs and nodules (`slices.field_of_view: lungs`), so nodules span more "
                 "pixels.",
        "window": f"A window {size * params['slices'].get('pixel_mm', 0):g} mm across in the lungs, holding the "
                  f"slice's nodules (`slices.field_of_view: window`, {params['slices'].get('pixel_mm', 0):g} mm "
                  "pixels in every scan), so nodules span more pixels; segmentation is scored within it.",
    }.get(view, "The whole axial slice, cropped to the body (`slices.field_of_view: body`).")
    rows.append(Difference("000", "field of view", "The whole axial slice.", ours, view == "body"))

    split = params["preprocess"]["split"]
    rows.append(Difference(
        "000", "split", "8:1:1 split of slices, so one patient's slices fall in train and test (leakage).",
        f"Patient-level split {_g(split['train'])} / {_g(split['val'])} / {_g(split['test'])} "
        "(`preprocess.split`), no patient in two splits, to avoid that leakage.", False))

    autoencoders = _entries(params, AUTOENCODER_METHODS, ("methods", "multihead"))
    if autoencoders:
        with_term, without = [], []
        for name, entry in autoencoders.items():
            loss = entry.get("loss") if isinstance(entry.get("loss"), Mapping) else {}
            on = float(loss.get("perceptual") or 0.0) > 0 and bool(loss.get("perceptual_weights"))
            (with_term if on else without).append(name)
        if without:
            verb = "trains" if len(without) == 1 else "train"
            ours = (f"{_names(without)} {verb} without the perceptual term (no `loss.perceptual` weight with "
                    "`loss.perceptual_weights` and its `perceptual_sha256`)")
            ours += f"; {_names(with_term)} with it." if with_term else "."
        else:
            ours = f"Every autoencoder entry ({_names(with_term)}) adds the perceptual term (`loss.perceptual_weights`)."
        rows.append(Difference("000", "perceptual loss",
                               "Autoencoders trained with L1 + LPIPS (VGG) perceptual + codebook + PatchGAN losses.",
                               ours, not without))

    runs = params.get("runs") or {}
    entries = {**(params.get("methods") or {}), **(params.get("multihead") or {})}
    latent_runs = {name: run for name, run in runs.items()
                   if run.get("task") == "cls" and run.get("arch") in LATENT_RESNET_ARCHS}
    if latent_runs:
        reads = {}
        for name, run in latent_runs.items():
            backbone = (entries.get(run.get("init")) or {}).get("backbone")
            reads[name] = _classifier_input(backbone, size)
        rows.append(Difference(
            "000", "classifier input",
            f"A ResNet on the autoencoder's quantised latent (16 x 32 x 32 for a {SEED000_SLICE_SIZE} px slice).",
            _grouped(reads) + ".", False))

        rows.append(_classification_balance(params["slices"], latent_runs))
    with_cls_head = {name: entry for name, entry in (params.get("multihead") or {}).items()
                     if "cls" in (entry.get("heads") or [])}
    if with_cls_head:
        rows.append(_multitask_classification_balance(with_cls_head))
    return rows


def _multitask_classification_balance(entries: Mapping[str, Mapping[str, Any]]) -> Difference:
    """The multi-task cls head trains on the pretraining slices, mostly clean: its weights
    answer the seed's protocol only when computed from those slices' class counts."""
    weights = {name: ("weights balanced to the expected class counts of its training epoch "
                      "(`cls_class_weights: balanced`)" if entry["cls_class_weights"] == "balanced"
                      else "weights [" + ", ".join(_g(w) for w in entry["cls_class_weights"]) + "]")
               for name, entry in entries.items()}
    return Difference(
        "000", "multi-task classification balance",
        f"The classification head trained with the autoencoder, cross-entropy weights "
        f"[{', '.join(_g(w) for w in SEED000_CLS_WEIGHTS)}] (clean, nodule) for its own class counts.",
        f"The cls head trains on every pretraining slice (mostly clean; slices with only a few nodule pixels do "
        f"not count), cross-entropy {_grouped(weights)}.",
        all(entry["cls_class_weights"] == "balanced" for entry in entries.values()))


def _classification_balance(slices: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]]) -> Difference:
    """Seed 000's clean slices come from patients without annotations and its weights [50, 1]
    answered its own class counts: we match it with clean slices from nodule-free patients
    and weights computed from each run's sampled training set (``class_weights: balanced``),
    never with its numbers, which fit another set of counts."""
    clean = slices["clean_per_nodule_slice"]
    from_free = slices["clean_source"] == "nodule_free_patients"
    weights = {name: ("weights balanced to its training set's class counts (`class_weights: balanced`)"
                      if run["class_weights"] == "balanced"
                      else "weights [" + ", ".join(_g(w) for w in run["class_weights"]) + "]")
               for name, run in runs.items()}
    balanced = all(run["class_weights"] == "balanced" for run in runs.values())
    source = ("patients without any annotation" if from_free else "any slice without nodule pixels")
    return Difference(
        "000", "classification balance",
        f"Cross-entropy weights [{', '.join(_g(w) for w in SEED000_CLS_WEIGHTS)}] (clean, nodule) for its own class "
        "counts, clean slices from patients without nodules.",
        f"Cross-entropy {_grouped(weights)} on {_g(clean)} clean slice(s) per nodule slice "
        f"(`slices.clean_per_nodule_slice`), drawn from {source} (`slices.clean_source`).",
        from_free and balanced)


def _classifier_input(backbone: Any, size: int) -> str:
    """What a ResNet classifier reads from ``backbone`` (:class:`~chestssl.models.classifier.LatentResNetClassifier`
    reads ``encoder.latent``, never the autoencoder's adapter or quantiser)."""
    if not isinstance(backbone, Mapping):
        return "A ResNet on the encoder's latent map"
    name = backbone.get("name")
    if name == "swin":
        stride = int(backbone["patch_size"]) * 16
        side = max(size // stride, 1)
        return (f"A ResNet on the encoder's deepest Swin map ({int(backbone['feature_size']) * 16} channels, "
                f"{side} x {side} for a {size} px slice), not the autoencoder latent")
    if name == "cnn_attention":
        stride = 2 ** (len(backbone["channel_multipliers"]) - 1)
        return (f"A ResNet on the CNN-attention encoder's output ({backbone['latent_channels']} channels at 1/{stride} "
                "of the side), before the autoencoder's adapter and quantiser")
    return f"A ResNet on the {name} encoder's latent map, not an autoencoder latent"


# ---------------------------------------------------------------- seed 001

def _seed001(params: Mapping[str, Any]) -> list[Difference]:
    """Seed 001 (Barlow Twins for chest X-ray): radiograph pretraining length, radiographs,
    label fractions."""
    rows = []
    block = params.get("pretrain_radiographs") or {}
    barlow = [name for name in block.get("methods") or []
              if (params["methods"].get(name) or {}).get("method") == "barlow_twins"]
    if barlow:
        trains = {name: radiograph_entry(params, name, listed_in=None)["train"] for name in barlow}
        lengths = {name: (train["epochs"], _global_batch(train, params)) for name, train in trains.items()}
        ours = _grouped({name: f"{epochs} epochs at batch {batch}" for name, (epochs, batch) in lengths.items()})
        rows.append(Difference(
            "001", "radiograph pretraining length",
            "60 epochs at batch 128 on CheXpert frontal images (300 epochs on COVID-19 Radiography).",
            f"{ours} ({_names(barlow)}; `pretrain_radiographs.train`, then the entry's "
            "`pretrain_radiographs.per_entry.<entry>.train`).",
            all(length == (SEED001_RADIOGRAPH_TRAIN["epochs"], SEED001_RADIOGRAPH_TRAIN["global_batch"])
                for length in lengths.values())))
        source, ours = _radiographs(params)
        cxr = params["data"].get("cxr") or {}
        same = source == "covid_radiography" or (source == "chexpert" and bool(cxr.get("frontal_only")))
        rows.append(Difference("001", "radiographs", "CheXpert frontal images and COVID-19 Radiography.",
                               ours[0].upper() + ours[1:] + ".", same))

    fractions = params.get("label_fraction") or {}
    if fractions.get("runs"):
        shares = ", ".join(f"{f * 100:g}" for f in fractions["fractions"])
        listed = sorted(float(f) for f in fractions["fractions"])
        seed_shares = len(listed) == len(SEED001_LABEL_FRACTIONS) and all(
            _close(a, b) for a, b in zip(listed, SEED001_LABEL_FRACTIONS))
        if fractions.get("unit") == "images":
            ours = (f"Shares {shares}% of each run's training images (nested; a classification share keeps both "
                    "classes in their overall proportion, at least one image of each; `label_fraction.unit`, "
                    "`label_fraction.fractions`).")
        else:
            ours = (f"Shares {shares}% of the training patients with a nodule slice (nested, at least one patient "
                    "each; `label_fraction.unit`, `label_fraction.fractions`).")
        rows.append(Difference(
            "001", "label fractions", "Shares 1, 5, 10, 15, 20, 25, 50, 100% of the training images.",
            ours, fractions.get("unit") == "images" and seed_shares))
    return rows


# ---------------------------------------------------------------- seed 002

def _seed002(params: Mapping[str, Any]) -> list[Difference]:
    """Seed 002 (STN alignment of chest X-rays): the radiographs aligned."""
    alignment = params.get("alignment") or {}
    if alignment.get("feature_method") not in ((params.get("pretrain_radiographs") or {}).get("methods") or []):
        return []
    source, ours = _radiographs(params)
    return [Difference("002", "radiographs", "ChestX-ray14 frontal radiographs.", ours[0].upper() + ours[1:] + ".",
                       source == "chestxray14")]


# ---------------------------------------------------------------- seed 003

def _seed003(params: Mapping[str, Any]) -> list[Difference]:
    """Seed 003 (Disruptive Autoencoders), for the ``dae`` entries: learning-rate schedule,
    training length (2D slices, by their ``epoch_unit``; 3D crops), global batch and crops
    of 3D entries, CT intensity window, precision, pretraining data."""
    dae = _entries(params, ("dae",))
    if not dae:
        return []
    rows = []
    rows.append(Difference(
        "003", "learning-rate schedule", "AdamW 1e-4, warm-up 4 epochs from 1e-6, then cosine to 1e-5.",
        _grouped({name: _schedule(entry["train"]) for name, entry in dae.items()}) + " (recipe keys `warmup_epochs`, "
        "`min_lr`, `scheduler`).",
        all(_matches_seed003_schedule(entry["train"]) for entry in dae.values())))

    flat = {name: entry for name, entry in dae.items() if _spatial_dims(entry) == 2}
    volumetric = {name: entry for name, entry in dae.items() if _spatial_dims(entry) == 3}
    seed_length = "300 epochs (1000 for `all`) over 3D volumes, one random 96^3 crop of each per epoch."
    if flat:
        over = {"scans": "one axial slice per training scan, drawn anew each epoch",
                "slices": "every axial slice of every training scan"}
        units = {name: _epoch_unit(entry) for name, entry in flat.items()}
        rows.append(Difference(
            "003", "training length (2D)", seed_length,
            _grouped({name: f"{entry['train']['epochs']} epochs of {over[units[name]]}"
                      for name, entry in flat.items()})
            + " (the entry's `epoch_unit`)" + (", so many more steps per epoch" if "slices" in units.values() else "")
            + ".",
            all(units[name] == "scans" and _seed003_epochs(entry) for name, entry in flat.items())))
    crops = params.get("crops") or {}
    if volumetric:
        per_scan, side = int(crops["per_scan"]), int(crops["side"])
        rows.append(Difference(
            "003", "training length (3D)", seed_length,
            _grouped({name: f"{entry['train']['epochs']} epochs" for name, entry in volumetric.items()})
            + f" over {per_scan} crop(s) of {side}^3 per training scan (`crops.per_scan`), "
            + (f"{per_scan}x the seed's steps per epoch." if per_scan > 1 else "as many steps per epoch as the seed."),
            per_scan == 1 and all(_seed003_epochs(entry) for entry in volumetric.values())))
        batches = {}
        for name, entry in volumetric.items():
            train, launch = entry["train"], params.get("launch") or {}
            batches[name] = (f"{train['batch_size']} x {train_setting(train, 'accumulate')} accumulated x "
                             f"{launch.get('nproc_per_node', 1)} process(es) x {launch.get('nnodes', 1)} node(s) = "
                             f"{_global_batch(train, params)} crops")
        rows.append(Difference(
            "003", "global batch (3D)", "16 crops per step (8 GPUs x 2).",
            _grouped(batches) + " (`train.batch_size`, `train.accumulate`, `launch`).",
            all(_global_batch(entry["train"], params) == SEED003_GLOBAL_BATCH for entry in volumetric.values())))
        every_epoch = crops["draw"] == "every_epoch"
        drawn = ("drawn anew every epoch (seeded per epoch)" if every_epoch
                 else "drawn once (seeded) and reused every epoch")
        rows.append(Difference(
            "003", "3D crops", "A new random 96^3 crop of each volume every epoch.",
            f"{per_scan} crop(s) of {side}^3 per scan {drawn}, each centred on a nodule voxel with probability "
            f"{_g(crops['positive_fraction'])} in scans with nodules (`crops`); validation crops are drawn once.",
            every_epoch and side == SEED003_CROP_SIZE))

    low, high = params["preprocess"]["hu_window"]
    rows.append(Difference(
        "003", "CT intensity window", "CT windowed to -1000..1000 HU, scaled to [0, 1].",
        f"CT windowed to {_g(low)}..{_g(high)} HU (`preprocess.hu_window`), scaled to [0, 1].",
        (float(low), float(high)) == SEED003_HU_WINDOW))

    precision = {name: (f"AMP {train_setting(entry['train'], 'amp_dtype')} on CUDA (`amp: true`)"
                        if entry["train"].get("amp") else "fp32 (`amp: false`)") for name, entry in dae.items()}
    rows.append(Difference(
        "003", "DAE precision", "fp32: AMP made the cross-modal contrastive loss NaN.", _grouped(precision) + ".",
        not any(entry["train"].get("amp") for entry in dae.values())))

    crossed = [name for name in (params.get("cross_modal") or {}).get("methods") or [] if name in dae]
    second = (f"radiographs are the second modality only in {_names(crossed)} (`cross_modal.methods`)" if crossed
              else "one modality, so the contrastive term stays off")
    rows.append(Difference(
        "003", "pretraining data", "CT of LUNA16, LIDC, TCIA COVID, HNSCC and Colonography plus MRI (BraTS).",
        f"{_ct(params)[0].upper() + _ct(params)[1:]} only; {second}.", False))
    return rows


def _epoch_unit(entry: Mapping[str, Any]) -> str:
    return entry.get("epoch_unit", DEFAULT_EPOCH_UNIT)


def _seed003_epochs(entry: Mapping[str, Any]) -> bool:
    """Whether a ``dae`` entry trains the seed's epochs for its disruption (1000 for ``all``, else 300)."""
    return entry["train"]["epochs"] == SEED003_EPOCHS.get(entry.get("disruption"), SEED003_DEFAULT_EPOCHS)


def _matches_seed003_schedule(train: Mapping[str, Any]) -> bool:
    return (train["optimizer"] == SEED003_SCHEDULE["optimizer"] and _close(train["lr"], SEED003_SCHEDULE["lr"])
            and train["scheduler"] == "cosine"
            and _close(train_setting(train, "warmup_epochs"), SEED003_SCHEDULE["warmup_epochs"])
            and _close(train_setting(train, "min_lr"), SEED003_SCHEDULE["min_lr"]))


# ---------------------------------------------------------------- seed 004

def _seed004(params: Mapping[str, Any]) -> list[Difference]:
    """Seed 004 (RadDiffusion), for the ``mae`` / ``diffmae`` and ViT entries: learning-rate
    schedule, radiograph pretraining length, ViT input size, radiographs."""
    rows = []
    masked = _entries(params, ("mae", "diffmae"))
    if masked:
        rows.append(Difference(
            "004", "learning-rate schedule", "AdamW 1.4e-4, warm-up 5% of the epochs, then cosine.",
            _grouped({name: _schedule(entry["train"], share=True) for name, entry in masked.items()})
            + " (recipe keys `warmup_epochs`, `scheduler`).",
            all(_matches_seed004_schedule(entry["train"]) for entry in masked.values())))

    block = params.get("pretrain_radiographs") or {}
    on_radiographs = [name for name in dict.fromkeys([*(block.get("methods") or []), *(block.get("study_methods") or [])])
                      if name in masked]
    if on_radiographs:
        texts, same = {}, True
        for name in on_radiographs:
            train = radiograph_entry(params, name, listed_in=None)["train"]
            batch = _global_batch(train, params)
            same = same and (train["epochs"], batch) == (SEED004_RADIOGRAPH_TRAIN["epochs"],
                                                         SEED004_RADIOGRAPH_TRAIN["global_batch"])
            texts[name] = f"{train['epochs']} epochs at batch {batch}"
        rows.append(Difference(
            "004", "radiograph pretraining length", "200 epochs at batch 512 studies (MIMIC-CXR).",
            _grouped(texts) + " (images, or studies for `pretrain_radiographs.study_methods`; "
            "`pretrain_radiographs.train`, then the entry's `pretrain_radiographs.per_entry.<entry>.train`).", same))

    vits = {name: entry["backbone"] for name, entry in (params.get("methods") or {}).items()
            if isinstance(entry.get("backbone"), Mapping) and entry["backbone"].get("name") == "vit"}
    radiograph_vits = {name: radiograph_entry(params, name, listed_in=None)["backbone"]
                       for name in dict.fromkeys([*(block.get("methods") or []), *(block.get("study_methods") or [])])
                       if name in vits}
    if radiograph_vits:
        sizes = {name: _vit_input(backbone) for name, backbone in radiograph_vits.items()}
        rows.append(Difference(
            "004", "ViT input", "256 x 256 px radiographs, patch 32 (64 tokens).",
            _grouped(sizes) + " on radiographs (`radiographs.side`; the patch of `backbones` or of "
            "`pretrain_radiographs.per_entry.<entry>.backbone`).",
            all(int(b["img_size"]) == SEED004_VIT["img_size"] and int(b["patch_size"]) == SEED004_VIT["patch_size"]
                for b in radiograph_vits.values())))
    elif vits:
        rows.append(Difference(
            "004", "ViT input", "256 x 256 px radiographs, patch 32 (64 tokens).",
            _grouped({name: _vit_input(backbone) for name, backbone in vits.items()})
            + " on CT slices only, no ViT entry trained on radiographs (`pretrain_radiographs.methods`).", False))

    if block.get("study_methods"):
        source, ours = _radiographs(params)
        rows.append(Difference("004", "radiographs", "MIMIC-CXR studies of 2 to 5 views.",
                               ours[0].upper() + ours[1:] + ".", source == "mimic_cxr"))
    return rows


def _vit_input(backbone: Mapping[str, Any]) -> str:
    side, patch = int(backbone["img_size"]), int(backbone["patch_size"])
    return f"{side} x {side} px, patch {patch} ({(side // patch) ** 2} tokens)"


def _matches_seed004_schedule(train: Mapping[str, Any]) -> bool:
    return (train["optimizer"] == SEED004_SCHEDULE["optimizer"] and _close(train["lr"], SEED004_SCHEDULE["lr"])
            and train["scheduler"] == "cosine"
            and _close(train_setting(train, "warmup_epochs"), SEED004_SCHEDULE["warmup_share"] * train["epochs"]))


# ---------------------------------------------------------------- every seed

def _every_seed(params: Mapping[str, Any]) -> list[Difference]:
    """Points every seed shares: mixed precision (only seed 003 states fp32) and one
    training run per reported number."""
    recipes = {name: recipe for name, recipe in (params.get("recipes") or {}).items() if recipe}
    amp = {name: train_setting(recipe, "amp_dtype") for name, recipe in recipes.items() if recipe.get("amp")}
    fp32 = [name for name in recipes if name not in amp]
    parts = [f"AMP {dtype} on CUDA in recipe(s) {_names(n for n, d in amp.items() if d == dtype)}"
             for dtype in dict.fromkeys(amp.values())]
    if fp32:
        parts.append(f"fp32 in {_names(fp32)}")
    rows = [Difference("all", "mixed precision", "fp32 where stated (seed 003); the others state no precision.",
                       "; ".join(parts) + " (`amp`, `amp_dtype`); CPU runs are fp32.", not amp)]
    seeds = training_seed_values(params)
    if len(seeds) == 1:
        ours = (f"One training seed (`seed: {seeds[0]}`) per run; the intervals are over test patients only, not "
                "over training runs.")
    else:
        ours = (f"Each fine-tuning run trained with {len(seeds)} seeds ({', '.join(map(str, seeds))}; "
                "`training_seeds`) on the same data: the tables give the first seed's value and patient-bootstrap "
                "interval and the mean ± sd over seeds; pretraining, the label-fraction and frozen-parts studies "
                "train once.")
    rows.append(Difference("all", "training seeds", "One training run per reported number, without intervals.",
                           ours, len(seeds) == 1))
    return rows


# ---------------------------------------------------------------- public

def protocol_differences(params: Mapping[str, Any]) -> list[Difference]:
    """Every point where the protocol of ``params`` (validated) is compared with a seed's.

    Rows come seed by seed (000 ... 004, then the points every seed shares); a point that
    does not apply to ``params`` (e.g. no 3D DAE entry) gives no row.
    """
    return [*_seed000(params), *_seed001(params), *_seed002(params), *_seed003(params), *_seed004(params),
            *_every_seed(params)]


def protocol_differences_table(differences: Iterable[Difference]) -> Table:
    """The differences as a report table: CSV columns ``seed, topic, seed_protocol, ours,
    matches``; Markdown columns Seed, What, The seed's protocol, Ours, Same? (yes / no)."""
    rows = [asdict(difference) for difference in differences]
    numbers = pd.DataFrame(rows, columns=list(COLUMNS))
    text = pd.DataFrame(
        [{COLUMNS[key]: ("yes" if row[key] else "no") if key == "matches" else str(row[key]) for key in COLUMNS}
         for row in rows],
        columns=list(COLUMNS.values()),
    )
    return Table(TABLE_NAME, TABLE_TITLE, numbers, text)
