"""Where each stage reads and writes, relative to the repository root.

dvc.yaml spells out the same paths; tests/pipeline checks that the two agree.
"""

from __future__ import annotations

import os
from pathlib import Path

RAW_DIR = Path("data/raw")
LIDC_DIR = RAW_DIR / "LIDC-IDRI"
MANIFEST = RAW_DIR / "manifest.csv"
PROCESSED_DIR = Path("data/processed")
RADIOGRAPHS_DIR = Path("data/radiographs")  # two-view radiographs rendered from the processed CT
CHECKPOINT_DIR = Path("checkpoints")  # resume state of interrupted training; not a DVC output
REPORTS_DIR = Path("reports")
CACHE_DIR_ENV = "CHESTSSL_CACHE_DIR"
DEFAULT_CACHE_DIR = Path(".cache")  # memory-mapped arrays derived from data/processed; neither git nor DVC


def cache_dir() -> Path:
    """The root of the array cache (:mod:`chestssl.data.array_cache`): ``$CHESTSSL_CACHE_DIR``
    if set, else ``.cache`` in the working directory (the project root when stages run)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def pretrain_model_dir(method: str) -> Path:
    return Path("models/pretrain") / method


def encoder_path(method: str) -> Path:
    return pretrain_model_dir(method) / "encoder.pt"


def pretrain_stage(name: str, params: dict) -> str:
    """The DVC stage that writes ``models/pretrain/<name>/``: ``pretrain@`` or ``pretrain_multihead@``."""
    return f"pretrain_multihead@{name}" if name in (params.get("multihead") or {}) else f"pretrain@{name}"


def method_weights_path(method: str) -> Path:
    return pretrain_model_dir(method) / "method.pt"


def pretrain_report_dir(method: str) -> Path:
    return REPORTS_DIR / "pretrain" / method


#: The encoders pretrained on the radiographs, one folder per ``methods`` entry.
RADIOGRAPH_ENCODER_DIR = Path("models/pretrain_radiographs")


def radiograph_model_dir(method: str) -> Path:
    """The encoder of ``methods.<method>`` pretrained on the rendered radiographs."""
    return RADIOGRAPH_ENCODER_DIR / method


def radiograph_report_dir(method: str) -> Path:
    return REPORTS_DIR / "pretrain_radiographs" / method


#: The STN of stage ``align_radiographs`` with the canonical chest it aligns to.
ALIGNMENT_STN = Path("models/alignment/stn.pt")


def radiograph_finetune_model_dir(run: str) -> Path:
    """The classifier of ``radiograph_runs.<run>`` fine-tuned on radiographs."""
    return Path("models/finetune_radiographs") / run


def radiograph_finetune_report_dir(run: str) -> Path:
    return REPORTS_DIR / "finetune_radiographs" / run


def radiograph_study_model_dir(method: str) -> Path:
    """The encoder of ``methods.<method>`` pretrained on whole radiograph studies (bottleneck CLS)."""
    return Path("models/pretrain_radiograph_studies") / method


def radiograph_study_report_dir(method: str) -> Path:
    return REPORTS_DIR / "pretrain_radiograph_studies" / method


def cross_modal_model_dir(method: str) -> Path:
    """The encoder of ``methods.<method>`` (a DAE) pretrained on CT slices and radiographs together."""
    return Path("models/pretrain_cross_modal") / method


def cross_modal_report_dir(method: str) -> Path:
    return REPORTS_DIR / "pretrain_cross_modal" / method


ALIGNMENT_MODEL_DIR = Path("models/alignment")  # the STN of seed 002's alignment experiment
ALIGNMENT_REPORT_DIR = REPORTS_DIR / "alignment"


def finetune_model_path(run: str) -> Path:
    return Path("models/finetune") / run / "model.pt"


def seed_model_path(model_path: str | Path, training_seed: int) -> Path:
    """The model of a run's extra training seed (``training_seeds``): ``<run folder>/seeds/<seed>/model.pt``,
    its curves beside it in ``live/``; the first seed's model is ``model_path`` itself."""
    return Path(model_path).parent / "seeds" / str(training_seed) / "model.pt"


def finetune_report_dir(run: str) -> Path:
    return REPORTS_DIR / "finetune" / run


def evaluate_dir(run: str) -> Path:
    return REPORTS_DIR / "evaluate" / run


def evaluate_pretrain_dir(method: str) -> Path:
    return REPORTS_DIR / "evaluate_pretrain" / method


def latent_diffusion_model_path(name: str) -> Path:
    """The DDPM of ``latent_diffusion.<name>`` with the frozen autoencoder it diffuses in."""
    return Path("models/latent_diffusion") / name / "model.pt"


def latent_diffusion_report_dir(name: str) -> Path:
    return REPORTS_DIR / "latent_diffusion" / name


def evaluate_latent_diffusion_dir(name: str) -> Path:
    """FID and the generated slices of ``latent_diffusion.<name>``."""
    return REPORTS_DIR / "evaluate_latent_diffusion" / name


#: The FID feature network's features of every test slice (stage ``fid_reference``), shared by
#: every ``evaluate_latent_diffusion@`` stage.
FID_REFERENCE = Path("data/fid/real_test_features.npz")


def checkpoint_path(stage: str, name: str) -> Path:
    return CHECKPOINT_DIR / stage / f"{name}.pt"


def multihead_heads_dir(name: str) -> Path:
    """Examples and per-slice scores of a multihead model's segmentation/classification heads."""
    return evaluate_pretrain_dir(name) / "heads"


def ablation_report_dir(ablation: str, run: str) -> Path:
    """Metrics and training curves of an ablation (``label_fraction``, ``frozen_parts`` and their
    ``_radiographs`` twins) of one run."""
    return REPORTS_DIR / ablation / run


def finetune_3d_model_path(run: str) -> Path:
    """The SwinUNETR 3D of ``runs_3d.<run>`` (stage ``finetune_3d@<run>``)."""
    return Path("models/finetune_3d") / run / "model.pt"


def finetune_3d_report_dir(run: str) -> Path:
    return REPORTS_DIR / "finetune_3d" / run


def evaluate_3d_dir(run: str) -> Path:
    return REPORTS_DIR / "evaluate_3d" / run
