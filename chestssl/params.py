"""Loading and validating the params files: ``params.yaml`` and :data:`PARAMS_FILES`.

Every stage calls :func:`load_params` first. The files are checked against :data:`SCHEMA`
before any work starts: an unknown key, a wrong type or a value out of range stops the
stage with a message naming the file, the key, the value and what is allowed, listing
every problem at once.

``methods``, ``multihead`` and ``runs`` are maps from a user-chosen name to an entry whose
schema depends on one of its keys (``method`` or ``task``). Entries name their backbone and
training recipe from the presets ``backbones`` and ``recipes``; :func:`validate` fills
them in, so the entries a stage receives are written out in full.
"""

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, get_args

import yaml
from pydantic import (
    AfterValidator, ConfigDict, Field, PlainSerializer, ValidationError, WrapValidator, create_model, model_validator,
)

from chestssl.errors import UserError
from chestssl.schema import (
    NAME_PATTERN, Bool, Config, Float, Int, List, Names, Nullable, Str, Tagged, problem, problems_of,
)

#: The chest X-ray sources ``data.cxr.source`` may name (readers in :mod:`chestssl.data.cxr`).
CXR_SOURCES = ("rendered", "chexpert", "chestxray14", "covid_radiography", "mimic_cxr")
#: What CheXpert / MIMIC-CXR uncertain labels (-1) become.
UNCERTAIN_POLICIES = ("positive", "negative", "ignore")
#: The 14 CheXpert observations, in the order of CheXpert's and MIMIC-CXR's label files.
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
#: The 14 ChestX-ray14 findings, as written in ``Finding Labels``.
CHESTXRAY14_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
#: The labels ``data.cxr.labels`` may keep, per dataset (COVID-19 Radiography has one: its class).
CXR_LABELS = {"chexpert": CHEXPERT_LABELS, "mimic_cxr": CHEXPERT_LABELS, "chestxray14": CHESTXRAY14_LABELS,
              "covid_radiography": ("class",)}
#: Widths of a ViT's sin-cos position embedding must be multiples of these, per spatial dims.
SINCOS_MULTIPLE = {2: 4, 3: 6}  # hidden_size divisibility of MONAI's sin-cos position embedding

class ParamsError(UserError, ValueError):
    """Raised when the params files do not match :class:`Params`; lists every problem."""

    def __init__(self, problems: list[str], source: str = "params.yaml"):
        self.problems = problems
        if len(problems) == 1:  # one problem, one line
            super().__init__(f"invalid parameters in {source}: {problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid parameters in {source}:\n{lines}")


# ---------------------------------------------------------------- the training recipe

#: The recipe keys that may be left out, and their values then: no warm-up, cosine to 0,
#: one batch per optimisation step, float16 when ``amp`` is on, validation after every epoch.
TRAIN_DEFAULTS = {"warmup_epochs": 0.0, "min_lr": 0.0, "accumulate": 1, "amp_dtype": "fp16", "val_every_epochs": 1}


def train_setting(cfg: Mapping[str, Any], key: str) -> Any:
    """``cfg[key]``, or the value an optional recipe key has when left out (:data:`TRAIN_DEFAULTS`)."""
    return cfg.get(key, TRAIN_DEFAULTS[key])


class TrainRecipe(Config):
    """The training loop's settings (:func:`chestssl.train.loop.fit`); a preset under ``recipes``."""

    epochs: Int(ge=1)
    batch_size: Int(ge=1)
    lr: Float(gt=0.0)
    weight_decay: Float(ge=0.0)
    optimizer: Str(choices=("adam", "adamw", "sgd"))
    betas: List(Float(ge=0.0, le=1.0), length=2)
    scheduler: Str(choices=("none", "cosine", "plateau"))
    grad_clip: Float(ge=0.0, doc="0 disables clipping")
    max_steps: Int(ge=0, doc="0: no limit")
    amp: Bool()
    num_workers: Int(ge=0)
    log_every: Int(ge=1)
    device: Str(choices=("auto", "cpu", "cuda"))
    warmup_epochs: Float(ge=0.0, doc="linear warm-up of the learning rate from 0 over this many epochs "
                                     "(fractions allowed), then the scheduler; seed 003: 4") = TRAIN_DEFAULTS["warmup_epochs"]
    min_lr: Float(ge=0.0, doc="the floor the cosine schedule ends at; seed 003: 1e-5") = TRAIN_DEFAULTS["min_lr"]
    accumulate: Int(ge=1, doc="batches whose gradients are averaged into one optimisation step, so the global "
                              "batch is batch_size x accumulate x processes; as under DDP, a loss that couples "
                              "a batch's items (Barlow Twins, contrastive) sees batch_size items") = \
        TRAIN_DEFAULTS["accumulate"]
    amp_dtype: Str(choices=("fp16", "bf16"), doc="the precision of `amp`: fp16 (with loss scaling) or bf16 "
                                                 "(Ampere GPUs and later; no scaling)") = TRAIN_DEFAULTS["amp_dtype"]
    val_every_epochs: Int(ge=1, doc="validate (and keep the best model of) every this many epochs and the last; "
                                    "for validations that cost more than training, e.g. DiffMAE's full reverse "
                                    "chain") = TRAIN_DEFAULTS["val_every_epochs"]

    @model_validator(mode="after")
    def _schedule(self) -> "TrainRecipe":
        for key, message in schedule_problems(self.model_dump()):
            raise problem(message, key)
        return self


def schedule_problems(train: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, message)`` for each learning-rate setting of a whole ``train`` block (a
    recipe, or a recipe with an entry's own keys over it) that the others contradict."""
    found = []
    warmup, min_lr = (train_setting(train, key) for key in ("warmup_epochs", "min_lr"))
    if warmup > 0 and train["scheduler"] == "plateau":
        found.append(("warmup_epochs", f"got {warmup:g}, but a warm-up needs scheduler 'cosine' or 'none' "
                                       "(plateau lowers the rate from the validation metric)"))
    if 0 < train["epochs"] <= warmup:
        found.append(("warmup_epochs", f"got {warmup:g}, expected fewer than the {train['epochs']} epochs"))
    if train_setting(train, "val_every_epochs") > 1 and train["scheduler"] == "plateau":
        found.append(("val_every_epochs", f"got {train_setting(train, 'val_every_epochs')}, but the plateau "
                                          "schedule reads the validation metric after every epoch; set it to 1"))
    if min_lr > 0 and train["scheduler"] != "cosine":
        found.append(("min_lr", f"got {min_lr:g}, but only the cosine schedule has a floor (scheduler is "
                                f"{train['scheduler']!r}); set it to 0"))
    if 0 < train["lr"] <= min_lr:
        found.append(("min_lr", f"got {min_lr:g}, expected less than lr ({train['lr']:g})"))
    return found


#: An entry's own ``train`` keys: any of a recipe's, replacing the recipe's value.
TrainOverrides = create_model(
    "TrainOverrides", __base__=Config, __doc__="Some of a recipe's keys, replacing the recipe's values.",
    **{name: (annotation, None) for name, annotation in TrainRecipe.__annotations__.items()},
)

def _some_weight(weights: list[float]) -> list[float]:
    if not any(weights):
        raise problem(f"got {weights!r}, expected class weights that are not all 0 (nothing would be learned)")
    return weights


#: Weights of the classes (background, nodule) of a loss; not all 0.
ClassWeights = Annotated[List(Float(ge=0.0), length=2), AfterValidator(_some_weight)]
#: ``class_weights`` of a classification run that are computed from its training set's class counts.
BALANCED = "balanced"


def _balanced_or_weights(value: Any, handler):
    if value == BALANCED:
        return value
    if not isinstance(value, list) or len(value) != 2:
        raise problem(f"got {value!r}, expected {BALANCED!r} (weights from the training set's class counts) or a "
                      "list of 2 numbers >= 0 (clean, nodule), not both 0")
    return handler(value)


#: Weights of the classes (clean, nodule) of a classification loss: :data:`ClassWeights`,
#: or ``balanced``: ``n_items / (2 * n_items_of_the_class)`` over the run's actual training
#: set (sklearn's "balanced"; :func:`chestssl.tasks.cls.resolve_class_weights`).
ClsClassWeights = Annotated[ClassWeights, WrapValidator(_balanced_or_weights),
                            PlainSerializer(lambda value: value, return_type=Any)]

#: The fewest entries each pretraining section may hold.
MIN_ENTRIES = {"methods": 1, "multihead": 0}

#: The recipe of entries that are not trained (scratch initialisations).
NO_RECIPE = "none"


# ---------------------------------------------------------------- backbones (encoders)

def check_levels(channels: int, multipliers: list[int], groups: int) -> None:
    """A VQGAN-style stack of levels: 1 to 5 of them, each width a multiple of ``groups``."""
    if not 1 <= len(multipliers) <= 5:
        raise problem(key="channel_multipliers", message=f"got {multipliers!r}, expected 1 to 5 levels")
    widths = [channels * m for m in multipliers]
    if any(width % groups for width in widths):
        raise problem(key="norm_num_groups",
                      message=f"got {groups}, which does not divide every level width {widths}")


class UNetEncoderBackbone(Config):
    """The down path of MONAI's BasicUNetPlusPlus (:mod:`chestssl.models.unet`)."""

    name: Literal["unet_encoder"]
    spatial_dims: Int(choices=(2, 3))
    features: List(Int(ge=1), length=5)


class CNNAttentionBackbone(Config):
    """VQGAN-style convolutional encoder with attention (:mod:`chestssl.models.cnn_attention`)."""

    name: Literal["cnn_attention"]
    spatial_dims: Int(choices=(2, 3))
    channels: Int(ge=1, doc="width of the first level")
    channel_multipliers: List(Int(ge=1), doc="one per level, at most 5")
    num_res_blocks: Int(ge=1)
    latent_channels: Int(ge=1)
    norm_num_groups: Int(ge=1, doc="must divide every level width")

    @model_validator(mode="after")
    def _levels(self) -> "CNNAttentionBackbone":
        check_levels(self.channels, self.channel_multipliers, self.norm_num_groups)
        return self


class SwinBackbone(Config):
    """The Swin transformer of MONAI's SwinUNETR (:mod:`chestssl.models.swin`)."""

    name: Literal["swin"]
    spatial_dims: Int(choices=(2, 3))
    feature_size: Int(ge=12, doc="a multiple of 12")
    patch_size: Int(ge=1)
    window_size: Int(ge=1)
    depths: List(Int(ge=1), length=4)
    num_heads: List(Int(ge=1), length=4, doc="the k-th divides feature_size * 2^k")
    use_checkpoint: Bool(doc="recompute each Swin block's activations in the backward pass: "
                             "the same numbers, less memory, more compute") = False

    @model_validator(mode="after")
    def _widths(self) -> "SwinBackbone":
        if self.feature_size % 12:
            raise problem(key="feature_size",
                          message=f"got {self.feature_size}, expected a multiple of 12 (SwinUNETR)")
        for stage, heads in enumerate(self.num_heads):
            if (self.feature_size * 2**stage) % heads:
                raise problem(key=f"num_heads[{stage}]",
                              message=f"got {heads}, which does not divide that stage's width "
                                      f"{self.feature_size * 2**stage} (feature_size * 2^{stage})")
        return self


class ResNetBackbone(Config):
    """MONAI's ResNet without its fc (:mod:`chestssl.models.resnet`); seed 001's backbone."""

    name: Literal["resnet18", "resnet50"]
    spatial_dims: Int(choices=(2, 3))
    block_inplanes: List(Int(ge=1), length=4, doc="widths of layer1..4; MONAI: 64..512")


class ViTBackbone(Config):
    """A ViT with a CLS token (:mod:`chestssl.models.vit`); seed 004's encoder."""

    name: Literal["vit"]
    spatial_dims: Int(choices=(2, 3))
    img_size: Int(ge=1, doc="side of the input; equal to slices.side (2D) or crops.side (3D); an entry trained "
                            "on radiographs takes radiographs.side instead")
    patch_size: Int(ge=1, doc="divides img_size")
    hidden_size: Int(ge=1, doc="a multiple of num_heads")
    num_layers: Int(ge=1)
    num_heads: Int(ge=1)
    mlp_dim: Int(ge=1)

    @model_validator(mode="after")
    def _width(self) -> "ViTBackbone":
        multiple = SINCOS_MULTIPLE[self.spatial_dims]
        if self.hidden_size % self.num_heads:
            raise problem(key="hidden_size",
                          message=f"got {self.hidden_size}, which is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % multiple:
            raise problem(key="hidden_size", message=f"got {self.hidden_size}, expected a multiple of {multiple} for "
                          f"{self.spatial_dims}D sin-cos position embeddings")
        return self


#: A backbone preset: its schema follows its ``name``.
Backbone = Tagged("name", UNetEncoderBackbone, CNNAttentionBackbone, SwinBackbone, ResNetBackbone, ViTBackbone)

#: How entries name their presets: ``backbone: <name>`` (under ``backbones``) and
#: ``recipe: <name>`` (under ``recipes``, the loop's settings; ``none``: not trained).
BackboneRef = Str(doc="a name under `backbones`")
RecipeRef = Str(doc="a name under `recipes`")


# ---------------------------------------------------------------- entries

class Entry(Config):
    """What every entry has: its training recipe, and its own changes to it."""

    recipe: RecipeRef
    train: TrainOverrides | None = None


#: ``epoch_unit`` of a 2D pretraining entry, what its training epoch goes over: ``slices``
#: (the default), every axial slice of every training scan; ``scans``, one slice of each
#: training scan, drawn anew every epoch, as seed 003's epochs went over volumes
#: (:mod:`chestssl.data.slice_epochs`). 3D entries go over ``crops.per_scan`` crops per scan.
EPOCH_UNITS = ("slices", "scans")
DEFAULT_EPOCH_UNIT = EPOCH_UNITS[0]


class MethodConfig(Entry):
    """Base of a pretraining method's params entry (under ``methods`` or ``multihead``).

    Each method declares its own in its module (e.g. :class:`chestssl.methods.dae.DAEConfig`),
    with a ``method: Literal["<name>"]`` field naming it; :func:`validate` checks the
    entries against the configs it is given (``method_configs``).
    """

    backbone: BackboneRef
    epoch_unit: Str(choices=EPOCH_UNITS, doc="what a training epoch of a 2D entry goes over: every slice, or one "
                                             "slice of each scan drawn anew (seed 003)") = DEFAULT_EPOCH_UNIT
    #: The params section holding this method's entries.
    section: ClassVar[str] = "methods"
    #: The backbone presets (their ``name``) the method can be built on; ``None``: any.
    backbone_names: ClassVar[tuple[str, ...] | None] = None

    def entry_problems(self, backbone: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Problems of this entry that need its ``backbone`` preset (or that should be listed
        with the cross-checks), as (key under the entry or "", message) pairs; none by default."""
        return []


class UncheckedMethod(MethodConfig):
    """Any method's entry, its own keys left to its config: what stages that build no
    method check (they import neither torch nor the methods)."""

    model_config = ConfigDict(extra="allow")

    method: Str(doc="a pretraining method")


def method_kind(config: type[MethodConfig]) -> str:
    """The ``method`` name a config stands for (its ``Literal``)."""
    (name,) = get_args(config.model_fields["method"].annotation)
    return name



# ---------------------------------------------------------------- downstream runs (`runs`)

InitRef = Str(doc="an entry name under `methods` or `multihead`")


#: The backbones (their ``name``) each downstream ``arch`` can be built on.
SEG_ARCH_BACKBONES = {"unetpp": ("unet_encoder", "cnn_attention"), "swin_unetr": ("swin",)}
CLS_ARCH_BACKBONES = {"resnet18": ("unet_encoder", "cnn_attention", "swin"),
                      "resnet50": ("unet_encoder", "cnn_attention", "swin"),
                      "linear": ("unet_encoder", "cnn_attention", "swin", "resnet18", "resnet50", "vit")}
#: The patch size of a Swin encoder that SwinUNETR's decoder can read.
SWIN_UNETR_PATCH_SIZE = 2


class SegRun(Entry):
    """Nodule segmentation on CT slices (:mod:`chestssl.tasks`)."""

    arch_backbones: ClassVar[dict[str, tuple[str, ...]]] = SEG_ARCH_BACKBONES

    task: Literal["seg"]
    arch: Str(choices=("unetpp", "swin_unetr"))
    init: InitRef
    loss: Str(choices=("ce", "dice", "focal"))
    class_weights: ClassWeights
    focal_gamma: Float(ge=0.0)
    focal_alpha: Float(ge=0.0, le=1.0)


class ClsRun(Entry):
    """Nodule classification (benign / malignant) on CT slices (:mod:`chestssl.tasks`)."""

    arch_backbones: ClassVar[dict[str, tuple[str, ...]]] = CLS_ARCH_BACKBONES

    task: Literal["cls"]
    arch: Str(choices=("resnet18", "resnet50", "linear"), doc="ResNet on the latent, or a linear head")
    init: InitRef
    class_weights: ClsClassWeights


RunEntry = Tagged("task", SegRun, ClsRun)

#: Where ``evaluate_3d`` runs the sliding window: the whole processed volume, or its lung box
#: (``lung_box`` of the scan, every slice), which holds every nodule and about a third of the voxels.
SEG3D_REGIONS = ("volume", "lung_box")


class Seg3dRun(Entry):
    """Seed 003's downstream: 3D nodule segmentation with MONAI's SwinUNETR on the processed
    volumes (:mod:`chestssl.tasks.seg3d`), from the Swin encoder (``spatial_dims`` 3) of ``init``."""

    init: InitRef
    crop_size: Int(ge=64, doc="side of the random training crops and the sliding window; a multiple of 32; "
                              "seed 003: 96")
    crops_per_scan: Int(ge=1, doc="training crops per scan, drawn anew every epoch")
    positive_fraction: Float(ge=0.0, le=1.0, doc="share of training crops centred on a nodule voxel")
    overlap: Float(ge=0.0, lt=1.0, doc="overlap of the sliding windows at test time; seed 003: 0.5")
    sw_batch_size: Int(ge=1, doc="windows per forward pass at test time")
    region: Str(choices=SEG3D_REGIONS, doc="what is segmented at test time: the whole volume or its lung box")
    max_test_scans: Int(ge=0, doc="test scans segmented (the first in slices.csv order); 0: all")
    baseline: Nullable(Str(doc="the `runs_3d` entry this run is paired with in the report (its scratch twin)")) = None

    @model_validator(mode="after")
    def _window(self) -> "Seg3dRun":
        if self.crop_size % 32:
            raise problem(f"got {self.crop_size}, expected a multiple of 32 (SwinUNETR's stride)", key="crop_size")
        return self


#: Samplers of a latent diffusion entry (:data:`chestssl.models.latent_diffusion.SAMPLERS`).
DIFFUSION_SAMPLERS = ("ddpm", "ddim")


class LatentDiffusionEntry(Entry):
    """Seed 000's latent diffusion on the quantised latents of the ``methods`` entry of the
    same name (method ``vqgan``, 2D): the UNet, its noise schedule, and the sampling."""

    channels: List(Int(ge=1), doc="the DiffusionModelUNet's channels per level; seed 000: [192, 384, 768]")
    attention_levels: List(Bool(), doc="self-attention at each level; seed 000: at every level")
    num_res_blocks: Int(ge=1)
    num_head_channels: Int(ge=1, doc="channels per attention head")
    norm_num_groups: Int(ge=1, doc="divides every level's channels")
    timesteps: Int(ge=2, doc="DDPM training timesteps; seed 000: 1000")
    beta_start: Float(gt=0.0, lt=1.0, doc="linear beta schedule; seed 000: 1e-4 .. 2e-2")
    beta_end: Float(gt=0.0, lt=1.0)
    sampler: Str(choices=DIFFUSION_SAMPLERS, doc="ddpm: every timestep backwards (seed 000); ddim: `sampling_steps`")
    sampling_steps: Int(ge=1, doc="DDIM steps (ddpm runs `timesteps`)")
    samples: Int(ge=2, doc="generated slices scored by FID; seed 000: 1000")

    @model_validator(mode="after")
    def _unet(self) -> "LatentDiffusionEntry":
        if len(self.attention_levels) != len(self.channels):
            raise problem(f"got {len(self.attention_levels)} values for {len(self.channels)} channels levels",
                          key="attention_levels")
        uneven = [c for c in self.channels if c % self.norm_num_groups]
        if uneven:
            raise problem(f"got {self.norm_num_groups}, which does not divide channels {uneven}", key="norm_num_groups")
        if self.beta_start >= self.beta_end:
            raise problem(f"got {self.beta_start:g}, expected less than beta_end ({self.beta_end:g})", key="beta_start")
        if self.sampling_steps > self.timesteps:
            raise problem(f"got {self.sampling_steps}, expected at most timesteps ({self.timesteps})",
                          key="sampling_steps")
        return self


class Fid(Config):
    """Seed 000's generation metric: FID between generated and real test slices."""

    features: Str(doc="the `methods` entry (2D) whose frozen encoder's pooled features FID compares, unless "
                      "`network` is given")
    network: Str(doc="a TorchScript feature network on disk, (N, 3, S, S) in [0, 1] -> (N, F), e.g. Inception-v3 "
                     "or RadImageNet ResNet-50 as seed 000 compared; empty: `features`")
    network_sha256: Str(pattern=r"^([0-9a-f]{64})?$", doc="the network file's SHA-256 (checked before use)")
    network_size: Int(ge=16, doc="side of the images fed to `network` (Inception-v3: 299)")
    bootstrap_samples: Int(ge=0, doc="resamples of the interval (each a matrix square root of F x F)")

    @model_validator(mode="after")
    def _network(self) -> "Fid":
        if self.network and not self.network_sha256:
            raise problem("is empty, but `network` is given; put the file's SHA-256 here (sha256sum <file>)",
                          key="network_sha256")
        return self


# ---------------------------------------------------------------- data and preprocessing

URL_PATTERN = r"(?i)https?://(\[[0-9a-f:.]+\]|[^\s/?#@\[\]:]+)(:[0-9]{1,5})?([/?#]\S*)?"


class PhantomSource(Config):
    num_scans: Int(ge=1, le=1018)
    seed: Int(ge=0)
    max_slices: Int(ge=0, doc="0: no limit")
    noise_hu: Float(ge=0.0)
    anatomy: Str(choices=("ct", "geometric"), doc="ct: a real chest CT deformed per patient "
                 "(chestssl/data/ct_anatomy.py); geometric: drawn shapes")
    workers: Int(ge=1, le=64, doc="processes rendering scans at once; the data do not depend on it")


class TCIASource(Config):
    base_url: Str(pattern=URL_PATTERN, doc="an http(s) URL with a host, e.g. "
                  "https://services.cancerimagingarchive.net/nbia-api/services/v1")
    collection: Str()
    modality: Str()
    patients: List(Str())
    max_patients: Int(ge=0, doc="0: no limit")
    retries: Int(ge=0)
    backoff_s: Float(ge=0.0)
    timeout_s: Float(gt=0.0, doc="to connect, and between received bytes")
    min_rate_kbps: Float(ge=0.0, doc="kilobits/s; a request may take timeout_s + its expected size at this rate; "
                                     "0: no deadline")


class IDCSource(Config):
    patients: List(Str())
    max_patients: Int(ge=0, doc="0: no limit")
    endpoint_url: Str(pattern=URL_PATTERN, doc="an http(s) URL with a host: the S3 endpoint of IDC's public "
                      "buckets, https://s3.amazonaws.com, or a mirror's")
    workers: Int(ge=1, le=64, doc="objects downloaded at once")
    retries: Int(ge=0)
    timeout_s: Float(gt=0.0, doc="to connect, and between received bytes")
    min_rate_kbps: Float(ge=0.0, doc="kilobits/s; a request may take timeout_s + its object's size at this rate; "
                                     "0: no deadline")


class LocalSource(Config):
    path: Str()


class ChestXRaySource(Config):
    source: Str(choices=CXR_SOURCES, doc="rendered from the CT, or a real chest X-ray dataset at `root`")
    root: Str(doc="the dataset's folder in its published layout; unused when rendered")
    labels: List(Str(), doc="labels to keep; empty: all of the dataset's")
    uncertain: Str(choices=UNCERTAIN_POLICIES, doc="CheXpert / MIMIC-CXR uncertain labels (-1)")
    frontal_only: Bool()
    val_fraction: Float(ge=0.0, lt=1.0, doc="share of the training patients for val")
    test_fraction: Float(ge=0.0, lt=1.0, doc="COVID-19 Radiography only")
    seed: Int(ge=0, doc="seeds the val (and COVID-19 test) draw")

    @model_validator(mode="after")
    def _labels_and_shares(self) -> "ChestXRaySource":
        repeated = sorted({label for label in self.labels if self.labels.count(label) > 1})
        if repeated:
            raise problem(key="labels", message=f"got {list(self.labels)!r}, with {repeated} more than once")
        known = CXR_LABELS.get(self.source)
        unknown = [label for label in self.labels if known is not None and label not in known]
        if unknown:
            raise problem(key="labels", message=f"{unknown} are not {self.source} labels; allowed: "
                          + ", ".join(map(repr, known)) + " (or an empty list for all)")
        if self.source == "covid_radiography" and self.val_fraction + self.test_fraction >= 1.0:
            raise problem(f"val_fraction + test_fraction: got {self.val_fraction:g} + {self.test_fraction:g}, "
                          "expected a sum < 1 (the rest is the train split)")
        return self


class Data(Config):
    source: Str(choices=("phantom", "idc", "tcia", "local"))
    phantom: PhantomSource
    idc: IDCSource
    tcia: TCIASource
    local: LocalSource
    cxr: ChestXRaySource


class Split(Config):
    seed: Int(ge=0)
    train: Float(ge=0.0, le=1.0)
    val: Float(ge=0.0, le=1.0)
    test: Float(ge=0.0, le=1.0)


class Preprocess(Config):
    spacing: List(Float(gt=0.0), length=3)
    hu_window: List(Float(ge=-2000.0, le=4000.0), length=2)
    body_threshold_hu: Float(ge=-1100.0, le=1000.0)
    clevel: Float(gt=0.0, le=1.0)
    min_nodule_pixels: Int(ge=0)
    split: Split
    workers: Int(ge=1)
    on_error: Str(choices=("raise", "skip"))


#: Where classification's clean slices come from (``slices.clean_source``): any slice without
#: nodule pixels, or only patients without any annotation (seed 000;
#: :class:`chestssl.data.datasets.SliceDataset`).
CLEAN_SOURCES = ("any_slice", "nodule_free_patients")
FIELDS_OF_VIEW = ("body", "lungs", "window")


class Slices(Config):
    side: Int(ge=32, le=1024, doc="side of the square slices in pixels; the UNet encoder pools 4 times and needs "
                                  ">= 2 pixels at 1/16")
    clean_per_nodule_slice: Float(ge=0.0)
    clean_source: Str(choices=CLEAN_SOURCES, doc="clean slices from any slice without nodule pixels, or only from "
                                                 "patients without any annotation (seed 000)")
    field_of_view: Str(choices=FIELDS_OF_VIEW, doc="what a slice shows: the body (seed 000), the box of the "
                                                   "lungs and nodules, or a window side * pixel_mm mm across in "
                                                   "the lungs, around the slice's nodules")
    pixel_mm: Float(gt=0.0, le=20.0, doc="a slice pixel's size in mm with field_of_view: window (unused otherwise)")


class Radiographs(Config):
    side: Int(ge=32, le=1024, doc="side of the square radiographs in pixels, a multiple of 16")
    mu_water_per_mm: Float(gt=0.0, doc="linear attenuation of water per mm")
    window_percentiles: List(Float(ge=0.0, le=100.0), length=2)


Views = List(Str(choices=("frontal", "lateral")))


class RadiographPretrainingTrain(Config):
    epochs: Int(ge=1, doc="replaces the entry's train.epochs")
    batch_size: Int(ge=1, doc="replaces the entry's train.batch_size")


#: Backbone keys ``pretrain_radiographs.per_entry.<name>.backbone`` may not set: the network's
#: kind and dimension are the entry's, and a ViT's ``img_size`` is ``radiographs.side``.
RADIOGRAPH_FIXED_BACKBONE_KEYS = ("name", "spatial_dims", "img_size")


class RadiographEntrySettings(Config):
    """One entry's own settings on radiographs (``pretrain_radiographs.per_entry.<name>``), applied
    after ``pretrain_radiographs.train``: seed 001's Barlow Twins ran 60 epochs at batch 128 on
    CheXpert, seed 004's MAE 200 epochs at batch 512 studies with patch 32 on 256 px."""

    train: TrainOverrides | None = None
    backbone: Nullable(Annotated[dict[str, Any], Field(description="a mapping of some of the entry's backbone keys "
                                                                   "(not name, spatial_dims, img_size) to new values")]) = None


class RadiographPretraining(Config):
    methods: List(Str(), doc="`methods` entries (2D) also trained on the radiographs")
    study_methods: List(Str(), doc="`mae` / `diffmae` entries also trained on whole studies (bottleneck CLS)")
    views: Views
    train: RadiographPretrainingTrain
    per_entry: Names(RadiographEntrySettings)


class RadiographRun(Entry):
    """Fine-tuning on chest radiographs (:mod:`chestssl.tasks.radiograph_cls`): seed 001's
    linear head on a pretrained encoder, or seed 002's DenseNet-121, on unaligned or
    STN-aligned images."""

    arch: Str(choices=("linear", "densenet121"),
              doc="a linear head on the `init` encoder, the whole network trained (seed 001), or MONAI "
                  "DenseNet-121 from a seeded random start (seed 002)")
    init: Nullable(Str(doc="a `pretrain_radiographs.methods` entry; null for densenet121")) = None
    mode: Str(choices=("multiclass", "multilabel"),
              doc="one label per image, softmax (seed 001) | any number, one sigmoid each (seeds 002, 004)")
    aligned: Bool(doc="every image aligned by the STN of `align_radiographs` first (seed 002)") = False
    views: Views


class CrossModal(Config):
    methods: List(Str(), doc="2D `dae` entries also trained on CT slices and radiographs")
    views: Views
    radiograph_fraction: Float(gt=0.0, le=1.0, doc="share of each epoch's items that are radiographs, below 1")


class Alignment(Config):
    feature_method: Str(doc="a pretrain_radiographs method whose frozen encoder gives the feature loss")
    block_inplanes: List(Int(ge=1), length=4, doc="widths of the STN's ResNet-18 trunk")
    steps: Int(ge=1)
    batch_size: Int(ge=1)
    lr: Float(gt=0.0)
    weight_decay: Float(ge=0.0)
    pixel_weight: Float(ge=0.0, doc="weight of the pixel MSE to the canonical chest; seed 002: 15")
    max_shift: Float(ge=0.0, lt=1.0, doc="share of the image side; seed 002: 0.05")
    max_scale: Float(ge=0.0, lt=1.0, doc="relative scale change; seed 002: 0.05")
    max_rotation_deg: Float(ge=0.0, le=180.0)
    max_brightness: Float(ge=0.0, lt=1.0, doc="relative brightness change")
    max_contrast: Float(ge=0.0, lt=1.0, doc="relative contrast change")
    num_examples: Int(ge=1, doc="radiographs in the report's alignment figure")
    max_images: Int(ge=0, doc="frontal radiographs per split at most (whole patients); 0: all")

    @model_validator(mode="after")
    def _some_misalignment(self) -> "Alignment":
        if self.max_shift == 0 and self.max_scale == 0 and self.max_rotation_deg == 0:
            raise problem("max_shift, max_scale, max_rotation_deg: all 0, expected at least one > 0 (the STN learns "
                          "to undo that misalignment, and the alignment measures how much it undoes)")
        return self


#: ``crops.draw``: the training crops' positions drawn ``once`` (seeded, the same every
#: epoch) or anew ``every_epoch`` (seed 003); validation and test crops are always drawn once.
CROP_DRAWS = ("once", "every_epoch")


class Crops(Config):
    side: Int(ge=8, doc="side of the cubic crops of 3D methods in voxels; seed 003: 96")
    per_scan: Int(ge=1, doc="crops per scan (per epoch with draw every_epoch)")
    positive_fraction: Float(ge=0.0, le=1.0, doc="share of crops centred on a nodule")
    draw: Str(choices=CROP_DRAWS, doc="training crop positions drawn once, or anew every epoch (seed 003); "
                                      "validation and test crops are drawn once")


class Probe(Config):
    every_epochs: Int(ge=0, doc="linear probe during pretraining every N epochs; 0: only at the end")
    C: Float(gt=0.0, doc="inverse L2 strength of the logistic regression")
    max_iter: Int(ge=1)


class LabelFraction(Config):
    fractions: List(Float(gt=0.0, le=1.0), doc="nested shares of the training data (see `unit`); seed 001: 1, 5, "
                                               "10, 15, 20, 25, 50, 100% of the training images")
    runs: List(Str(), doc="`runs` entries repeated at each fraction")
    unit: Str(choices=("patients", "images"),
              doc="what the fractions are shares of: the training patients with nodule slices, or the run's "
                  "training images (seed 001's unit; classes kept in proportion)")
    radiograph_runs: List(Str(), doc="`radiograph_runs` entries repeated at each fraction of their training "
                                     "images (seed 001's unit, whatever `unit` says)") = []


class FrozenParts(Config):
    unfrozen_stages: List(Int(ge=0), doc="encoder stages trained with the head, deepest first; 0: head only")
    runs: List(Str(), doc="`runs` entries (task cls) repeated per setting")
    radiograph_runs: List(Str(), doc="`radiograph_runs` entries (arch linear) repeated per setting") = []


class Evaluate(Config):
    bootstrap_samples: Int(ge=0)
    confidence: Float(gt=0.0, lt=1.0)
    reconstruction_slices_per_patient: Int(ge=0, doc="test items per patient (evenly spaced) on which reconstruction "
                                                     "SSIM/PSNR are computed; 0: every test slice or crop")
    seg_threshold: Float(ge=0.0, le=1.0)
    cls_threshold: Float(ge=0.0, le=1.0)
    num_examples: Int(ge=1, doc="test items kept for the example figures (reconstructions, overlays)")


class SeedReconstructionRow(Config):
    """A row of a seed 000 reconstruction table: the seed's row and the entry beside it."""

    task: ClassVar[str | None] = None  # the head or run task the row shows (None: reconstruction)
    seed_row: Str(doc="the seed's row-header cells joined by ' / '")
    method: Nullable(Str(doc="a `methods` entry")) = None
    multihead: Nullable(Str(doc="a `multihead` entry")) = None


class SeedSegmentationRow(Config):
    """A row of a seed 000 segmentation table: the seed's row and a run or a multihead seg head beside it."""

    task: ClassVar[str | None] = "seg"
    seed_row: Str(doc="the seed's row-header cells joined by ' / '")
    run: Nullable(Str(doc="a `runs` entry of task seg")) = None
    multihead: Nullable(Str(doc="a `multihead` entry with a seg head")) = None


class SeedClassificationRow(Config):
    """A row of a seed 000 classification table: the seed's row and a run or a multihead cls head beside it."""

    task: ClassVar[str | None] = "cls"
    seed_row: Str(doc="the seed's row-header cells joined by ' / '")
    run: Nullable(Str(doc="a `runs` entry of task cls")) = None
    multihead: Nullable(Str(doc="a `multihead` entry with a cls head")) = None


class SegmentationFigureRow(Config):
    """One model of a segmentation figure: its label and a run or a multihead seg head."""

    task: ClassVar[str | None] = "seg"
    label: Str(doc="the model's label in the figure")
    run: Str(doc="a `runs` entry of task seg") = None
    multihead: Str(doc="a `multihead` entry with a seg head") = None


class SeedGenerationRow(Config):
    """A row of seed 000's generation (FID) table: the seed's row and the latent diffusion entry beside it."""

    task: ClassVar[str | None] = None
    seed_row: Str(doc="the seed's row header")
    latent_diffusion: Nullable(Str(doc="a `latent_diffusion` entry")) = None


class Report(Config):
    """The report: which entries each seed 000 table and each comparison figure shows, row by row."""

    seed000_reconstruction: List(SeedReconstructionRow, doc="rows of `seed_row` and `method` or `multihead`")
    seed000_pretrained_segmentation: List(SeedSegmentationRow, doc="rows of `seed_row` and `run` or `multihead`")
    seed000_segmentation_losses: List(SeedSegmentationRow, doc="rows of `seed_row` and `run` or `multihead`")
    seed000_classification_modules: List(SeedClassificationRow, doc="rows of `seed_row` and `run` or `multihead`")
    seed000_multihead_reconstruction: List(SeedReconstructionRow, doc="rows of `seed_row` and `method` or `multihead`")
    seed000_multihead_segmentation: List(SeedSegmentationRow, doc="rows of `seed_row` and `run` or `multihead`")
    seed000_multihead_classification: List(SeedClassificationRow, doc="rows of `seed_row` and `run` or `multihead`")
    seed000_generation: List(SeedGenerationRow, doc="rows of `seed_row` and `latent_diffusion`")
    segmentation_comparison: List(SegmentationFigureRow, doc="rows of `label` and `run` or `multihead`")
    feature_maps: List(SegmentationFigureRow, doc="rows of `label` and `run` or `multihead`")


def training_seed_values(params: Mapping[str, Any]) -> list[int]:
    """The seeds each downstream run trains with: ``seed``, ``seed + 1``, ... (``training_seeds`` of them).
    The first is the run's own model; the others give the mean and spread over training runs."""
    return [int(params["seed"]) + offset for offset in range(int(params["training_seeds"]))]


def process_count(launch: Mapping[str, Any]) -> int:
    """The processes a training stage runs in: ``launch.nproc_per_node`` x ``launch.nnodes``."""
    return int(launch["nproc_per_node"]) * int(launch["nnodes"])


class Launch(Config):
    """How many processes each training stage runs in (:mod:`chestssl.launch`)."""

    nproc_per_node: Int(ge=1, doc="processes (GPUs) per node; more than 1 in all starts torchrun")
    nnodes: Int(ge=1)
    rdzv_endpoint: Str(doc="host:port of the rendezvous, when nnodes > 1")
    rdzv_id: Str(doc="the job's rendezvous id, the same on every node")

    @model_validator(mode="after")
    def _rendezvous(self) -> "Launch":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise problem(f"nnodes is {self.nnodes}, but rdzv_endpoint is empty; give host:port of node 0, "
                          "reachable from every node", key="rdzv_endpoint")
        return self


class Params(Config):
    """Every params group, as written in ``params.yaml`` and :data:`PARAMS_FILES`."""

    seed: Int(ge=0)
    training_seeds: Int(ge=1, doc="trainings of each downstream run, seeded seed, seed + 1, ...")
    seg_beta: Float(ge=0.0, doc="weight of the segmentation loss in multihead pretraining")
    launch: Launch
    data: Data
    preprocess: Preprocess
    slices: Slices
    radiographs: Radiographs
    pretrain_radiographs: RadiographPretraining
    cross_modal: CrossModal
    alignment: Alignment
    crops: Crops
    probe: Probe
    recipes: Names(TrainRecipe, what="preset")
    backbones: Names(Backbone, what="preset")
    methods: Names(UncheckedMethod, min_entries=MIN_ENTRIES["methods"])
    multihead: Names(UncheckedMethod, min_entries=MIN_ENTRIES["multihead"])
    runs: Names(RunEntry)
    radiograph_runs: Names(RadiographRun)
    runs_3d: Names(Seg3dRun)
    label_fraction: LabelFraction
    frozen_parts: FrozenParts
    evaluate: Evaluate
    latent_diffusion: Names(LatentDiffusionEntry)
    fid: Fid
    report: Report


_CHECKED_MODELS: dict[tuple, type[Params]] = {}


def params_model(method_configs: Mapping[str, type[MethodConfig]] | None = None) -> type[Params]:
    """:class:`Params` with each ``methods`` / ``multihead`` entry checked against the config
    of its ``method`` (``method_configs``: ``{name: config}``, e.g.
    :func:`chestssl.methods.method_configs`); without them, entries are checked in shape only
    (:class:`UncheckedMethod`)."""
    if not method_configs:
        return Params
    key = tuple(sorted((name, config.__module__, config.__qualname__) for name, config in method_configs.items()))
    if key not in _CHECKED_MODELS:
        fields = {}
        for section in PRETRAIN_SECTIONS:
            members = [config for config in method_configs.values() if config.section == section]
            entry = Tagged("method", *members) if members else UncheckedMethod
            fields[section] = (Names(entry, min_entries=MIN_ENTRIES[section]), ...)
        _CHECKED_MODELS[key] = create_model("CheckedParams", __base__=Params, **fields)
    return _CHECKED_MODELS[key]


def _schema_check(raw: Mapping[str, Any], problems: list[str], model: type[Params] = Params) -> dict[str, Any]:
    """``raw`` checked against ``model``: plain data with floats normalised (keys as
    written; an entry's own ``train`` keys only where it has them)."""
    raw = dict(raw)
    recipes = raw.get("recipes")
    no_recipe = None
    recipes_written = list(recipes) if isinstance(recipes, Mapping) else []
    if isinstance(recipes, Mapping) and NO_RECIPE in recipes:
        recipes = dict(recipes)
        no_recipe = recipes.pop(NO_RECIPE)
        raw["recipes"] = recipes
        if no_recipe not in (None, {}):
            problems.append(f"recipes.{NO_RECIPE}: got {no_recipe!r}, expected an empty mapping "
                            "(the recipe of entries that are not trained)")
    try:
        checked = model.model_validate(raw).model_dump(by_alias=True, exclude_unset=True)
    except ValidationError as error:
        problems.extend(problems_of(error, model))
        return dict(raw)
    if no_recipe is not None:  # back in its place
        checked["recipes"] = {name: checked["recipes"].get(name, {}) for name in recipes_written}
    for section in PRESET_USERS:  # each entry's keys in the order they are written
        checked[section] = {name: {key: entry[key] for key in sorted(entry, key=list(raw[section][name]).index)}
                            for name, entry in checked[section].items()}
    return checked


def _check_latent_diffusion(params: Mapping[str, Any], methods: Mapping[str, Any], problems: list[str]) -> None:
    """Each ``latent_diffusion`` entry names a 2D ``vqgan`` entry of ``methods``; ``fid.features``
    a 2D ``methods`` entry (its encoder embeds the slices) when no ``fid.network`` is given."""
    vqgan = [name for name, entry in methods.items() if entry.get("method") == "vqgan"
             and entry.get("backbone", {}).get("spatial_dims") == 2]
    for name in params.get("latent_diffusion") or {}:
        if name not in vqgan:
            problems.append(f"latent_diffusion.{name}: expected the name of a 2D `methods` entry of method vqgan, "
                            f"whose latents it learns: {', '.join(vqgan) or 'there is none'}")
    fid = params.get("fid") or {}
    features = fid.get("features")
    if params.get("latent_diffusion") and not fid.get("network"):
        entry = methods.get(features)
        if not isinstance(entry, Mapping) or entry.get("backbone", {}).get("spatial_dims") != 2:
            two_d = [n for n, e in methods.items() if e.get("backbone", {}).get("spatial_dims") == 2]
            problems.append(f"fid.features: got {features!r}, expected a 2D `methods` entry whose encoder embeds "
                            f"the slices: {', '.join(two_d)}")


def _valid_name(name: Any) -> bool:
    """Whether ``name`` may name an entry or a preset: letters, digits, '_' and '-'."""
    return isinstance(name, str) and re.fullmatch(NAME_PATTERN, name) is not None



def _check_radiograph_runs(params: Mapping[str, Any], problems: list[str]) -> None:
    """A ``linear`` radiograph run starts from an encoder ``pretrain_radiographs`` trains; a
    ``densenet121`` one from none."""
    listed = (params.get("pretrain_radiographs") or {}).get("methods") or []
    for name, run in (params.get("radiograph_runs") or {}).items():
        init, arch = run.get("init"), run.get("arch")
        if arch == "linear" and init not in listed:
            problems.append(f"radiograph_runs.{name}.init: got {init!r}, expected one of pretrain_radiographs.methods "
                            f"({', '.join(listed) or 'none listed'}), whose radiograph encoders the pipeline trains")
        elif arch == "densenet121" and init is not None:
            problems.append(f"radiograph_runs.{name}.init: got {init!r}, but arch densenet121 starts from a seeded "
                            "random initialisation; set init to null")


def _cross_checks(params: dict, problems: list[str]) -> None:
    split = params.get("preprocess", {}).get("split", {})
    if all(isinstance(split.get(k), float) for k in ("train", "val", "test")):
        total = split["train"] + split["val"] + split["test"]
        if abs(total - 1.0) > 1e-6:
            problems.append(f"preprocess.split: train + val + test = {total:g}, expected 1")
    window = params.get("preprocess", {}).get("hu_window")
    if isinstance(window, list) and len(window) == 2 and all(isinstance(w, float) for w in window):
        if window[0] >= window[1]:
            problems.append(f"preprocess.hu_window: got {window}, expected [low, high] with low < high")
    radiographs = params.get("radiographs", {})
    if isinstance(radiographs.get("side"), int) and radiographs["side"] % 16:
        problems.append(f"radiographs.side: got {radiographs['side']}, expected a multiple of 16")
    low_high = radiographs.get("window_percentiles")
    if isinstance(low_high, list) and len(low_high) == 2 and low_high[0] >= low_high[1]:
        problems.append(f"radiographs.window_percentiles: got {low_high}, expected [low, high] with low < high")
    _check_radiograph_pretraining(params, problems)
    _check_radiograph_runs(params, problems)
    _check_cross_modal(params, problems)
    _check_epoch_units(params, problems)
    feature_method = (params.get("alignment") or {}).get("feature_method")
    listed = (params.get("pretrain_radiographs") or {}).get("methods") or []
    if isinstance(feature_method, str) and feature_method not in listed:
        problems.append(f"alignment.feature_method: got {feature_method!r}, expected one of pretrain_radiographs.methods "
                        f"({', '.join(listed) or 'none listed'}), whose encoders the pipeline trains")
    methods = params.get("methods") or {}
    multihead = params.get("multihead") or {}
    _check_latent_diffusion(params, methods, problems)
    for name in sorted(set(methods) & set(multihead)):
        problems.append(
            f"multihead.{name}: the name is also used under `methods`; pretrained models are stored by name "
            "(models/pretrain/<name>), so rename one of them"
        )
    for name, run in (params.get("runs") or {}).items():
        init = run.get("init") if isinstance(run, Mapping) else None
        init_entry = methods.get(init) or multihead.get(init)
        if isinstance(init_entry, Mapping) and init_entry.get("backbone", {}).get("spatial_dims") == 3:
            problems.append(
                f"runs.{name}.init: {init!r} has a 3D backbone, but the downstream runs train on 2D slices; "
                "init the run from a method with backbone.spatial_dims 2"
            )
    for name, run in (params.get("runs") or {}).items():
        if isinstance(run, Mapping) and run.get("init") not in methods and run.get("init") not in multihead:
            problems.append(
                f"runs.{name}.init: got {run.get('init')!r}, expected an entry name under `methods` or "
                "`multihead`: " + ", ".join([*methods, *multihead])
            )
            continue
        backbone = (methods.get(run["init"]) or multihead.get(run["init"]))["backbone"]
        allowed = (SEG_ARCH_BACKBONES if run["task"] == "seg" else CLS_ARCH_BACKBONES)[run["arch"]]
        if backbone["name"] not in allowed:
            problems.append(f"runs.{name}.arch: {run['arch']!r} needs a backbone of {', '.join(map(repr, allowed))}, "
                            f"but init {run['init']!r} has a {backbone['name']!r} backbone; pick another init or arch")
        elif run["arch"] == "swin_unetr" and backbone["patch_size"] != SWIN_UNETR_PATCH_SIZE:
            problems.append(f"runs.{name}.arch: SwinUNETR's decoder needs a Swin encoder with patch_size "
                            f"{SWIN_UNETR_PATCH_SIZE}, but init {run['init']!r} has patch_size {backbone['patch_size']}")
    _check_runs_3d(params, methods, problems)
    _check_ablations(params, problems)
    if params.get("data", {}).get("source") == "local" and not params["data"]["local"].get("path"):
        problems.append("data.local.path: empty, but data.source is 'local'; set it to your LIDC-IDRI folder")
    cxr = (params.get("data") or {}).get("cxr") or {}
    if cxr.get("source", "rendered") != "rendered" and not str(cxr.get("root") or "").strip():
        problems.append(f"data.cxr.root: empty, but data.cxr.source is {cxr.get('source')!r}; set it to the folder "
                        "holding that dataset in its published layout")
    _check_report(params, problems)


def run_3d_entry(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The validated ``runs_3d.<name>`` entry; a ``ParamsError`` naming the entries otherwise."""
    runs = params.get("runs_3d") or {}
    if name not in runs:
        raise ParamsError([f"runs_3d: {name!r} is not an entry ({', '.join(runs) or 'none'})"])
    return runs[name]


def _check_runs_3d(params: dict, methods: Mapping[str, Any], problems: list[str]) -> None:
    """Each ``runs_3d`` entry starts from a ``methods`` entry with a 3D Swin backbone of patch size 2,
    and its ``baseline`` names another ``runs_3d`` entry."""
    runs_3d = params.get("runs_3d") or {}
    for name, run in runs_3d.items():
        if not isinstance(run, Mapping):
            continue
        init = methods.get(run.get("init"))
        backbone = init.get("backbone") if isinstance(init, Mapping) else None
        if not isinstance(backbone, Mapping):
            problems.append(f"runs_3d.{name}.init: got {run.get('init')!r}, expected a `methods` entry with a 3D swin "
                            "backbone: " + (", ".join(m for m, e in methods.items() if isinstance(e, Mapping)
                                                      and e.get("backbone", {}).get("spatial_dims") == 3) or "none"))
        elif backbone.get("name") != "swin" or backbone.get("spatial_dims") != 3:
            problems.append(f"runs_3d.{name}.init: {run['init']!r} has a {backbone.get('spatial_dims')}D "
                            f"{backbone.get('name')!r} backbone, but SwinUNETR 3D needs a swin backbone with "
                            "spatial_dims 3")
        elif backbone.get("patch_size") != SWIN_UNETR_PATCH_SIZE:
            problems.append(f"runs_3d.{name}.init: SwinUNETR's decoder needs a Swin encoder with patch_size "
                            f"{SWIN_UNETR_PATCH_SIZE}, but {run['init']!r} has patch_size {backbone.get('patch_size')}")
        baseline = run.get("baseline")
        if baseline is not None and (baseline not in runs_3d or baseline == name):
            problems.append(f"runs_3d.{name}.baseline: got {baseline!r}, expected another `runs_3d` entry: "
                            + (", ".join(r for r in runs_3d if r != name) or "none"))


#: The keys by which a row of the params group ``report`` names its entry -> the section it names.
REPORT_ENTRY_SECTIONS = {"method": "methods", "run": "runs", "multihead": "multihead",
                         "latent_diffusion": "latent_diffusion"}


def _check_report(params: dict, problems: list[str]) -> None:
    """Each row of a ``report`` table or figure names one entry (``method``, ``run``,
    ``multihead`` or ``latent_diffusion``) that exists in its section, of the task the row
    shows; null (seed tables only) names none, and the row is shown as not run."""
    report = params.get("report")
    if not isinstance(report, Mapping):
        return
    sections = REPORT_ENTRY_SECTIONS
    for key, field in Report.model_fields.items():
        rows = report.get(key)
        if not isinstance(rows, list):
            continue
        row_type = get_args(field.annotation)[0]
        allowed = " or ".join(f"`{name}`" for name in sections if name in row_type.model_fields)
        for index, row in enumerate(rows):
            where = f"report.{key}[{index}]"
            named = [name for name in sections if name in row]
            if len(named) != 1:
                problems.append(f"{where}: names {' and '.join(f'`{n}`' for n in named) or 'no entry'}; "
                                f"name exactly one, {allowed}")
                continue
            entry_key = named[0]
            name, section = row[entry_key], sections[entry_key]
            entries = params.get(section) or {}
            if name is None:
                continue
            if name not in entries:
                problems.append(f"{where}.{entry_key}: {name!r} is not an entry under `{section}`: "
                                + (", ".join(entries) or "none"))
                continue
            entry, task = entries[name], row_type.task
            if task is None or not isinstance(entry, Mapping):
                continue
            if entry_key == "run" and entry.get("task") != task:
                problems.append(f"{where}.run: {name!r} is a {entry.get('task')!r} run; `report.{key}` shows "
                                f"`task: {task}` runs")
            if entry_key == "multihead" and task not in (entry.get("heads") or []):
                problems.append(f"{where}.multihead: {name!r} has no {task} head (heads: {entry.get('heads')}); "
                                f"`report.{key}` shows its {task} head")


def _check_ablations(params: dict, problems: list[str]) -> None:
    """The ablations name existing runs, each once, and list at least one setting."""
    runs = params.get("runs") or {}
    for ablation, settings_key in (("label_fraction", "fractions"), ("frozen_parts", "unfrozen_stages")):
        block = params.get(ablation)
        if not isinstance(block, Mapping):
            continue
        named = block.get("runs") if isinstance(block.get("runs"), list) else []
        settings = block.get(settings_key) if isinstance(block.get(settings_key), list) else []
        if named and not settings:
            problems.append(f"{ablation}.{settings_key}: empty; list at least one setting, or empty {ablation}.runs")
        for name in sorted({n for n in named if named.count(n) > 1}):
            problems.append(f"{ablation}.runs: {name!r} is listed twice; each run is one stage ({ablation}@{name})")
        for name in named:
            if name not in runs:
                problems.append(f"{ablation}.runs: {name!r} is not an entry under `runs`: " + ", ".join(runs))
            elif ablation == "frozen_parts" and isinstance(runs[name], Mapping) and runs[name].get("task") != "cls":
                problems.append(
                    f"frozen_parts.runs: {name!r} is a {runs[name].get('task')!r} run; the frozen-parts ablation "
                    "freezes the encoder under a classification head, so list `task: cls` runs"
                )
        _check_radiograph_ablation_runs(params, ablation, block, settings_key, settings, problems)


def _check_radiograph_ablation_runs(params: dict, ablation: str, block: Mapping, settings_key: str,
                                    settings: list, problems: list[str]) -> None:
    """``<ablation>.radiograph_runs`` name existing ``radiograph_runs`` entries, each once; the
    frozen-parts ones a linear head on a pretrained encoder."""
    runs = params.get("radiograph_runs") or {}
    named = block.get("radiograph_runs") if isinstance(block.get("radiograph_runs"), list) else []
    if named and not settings:
        problems.append(f"{ablation}.{settings_key}: empty; list at least one setting, or empty "
                        f"{ablation}.radiograph_runs")
    for name in sorted({n for n in named if named.count(n) > 1}):
        problems.append(f"{ablation}.radiograph_runs: {name!r} is listed twice; each run is one stage "
                        f"({ablation}_radiographs@{name})")
    for name in named:
        if name not in runs:
            problems.append(f"{ablation}.radiograph_runs: {name!r} is not an entry under `radiograph_runs`: "
                            + (", ".join(runs) or "none") + "; a profile that removes the run empties the list")
        elif ablation == "frozen_parts" and isinstance(runs[name], Mapping) and (
                runs[name].get("arch") != "linear" or runs[name].get("init") is None):
            problems.append(f"frozen_parts.radiograph_runs: {name!r} is a {runs[name].get('arch')!r} run without a "
                            "pretrained encoder; the frozen-parts ablation freezes stages of one, so list "
                            "`arch: linear` runs")


def _check_radiograph_pretraining(params: dict, problems: list[str]) -> None:
    """``pretrain_radiographs`` names 2D ``methods`` entries, each once; its ``study_methods`` are
    ``mae`` / ``diffmae`` entries, and studies have at least two views. (What the entries become on
    radiographs is checked by :func:`_check_radiograph_entries`.)"""
    block = params.get("pretrain_radiographs")
    if not isinstance(block, Mapping):
        return
    methods = params.get("methods") or {}
    views = block.get("views") if isinstance(block.get("views"), list) else []
    for view in sorted({v for v in views if views.count(v) > 1}):
        problems.append(f"pretrain_radiographs.views: {view!r} is listed twice")
    listed = {key: block.get(key) if isinstance(block.get(key), list) else [] for key in ("methods", "study_methods")}
    if any(listed.values()) and not views:
        problems.append("pretrain_radiographs.views: empty; list frontal, lateral or both")
    for key, named in listed.items():
        where = f"pretrain_radiographs.{key}"
        for name in sorted({n for n in named if named.count(n) > 1}):
            problems.append(f"{where}: {name!r} is listed twice; each is one stage")
        for name in named:
            entry = methods.get(name)
            if not isinstance(entry, Mapping):
                problems.append(f"{where}: {name!r} is not an entry under `methods`: " + ", ".join(methods))
                continue
            backbone = entry.get("backbone") or {}
            if key == "study_methods" and entry.get("method") not in ("mae", "diffmae"):
                problems.append(f"{where}: {name!r} is a {entry.get('method')!r} entry; study-level pretraining "
                                "shares the ViT's CLS token among a study's views, so list `mae` or `diffmae` entries")
            if backbone.get("spatial_dims") != 2:
                problems.append(f"{where}: {name!r} has a {backbone.get('spatial_dims')}D backbone; "
                                "radiographs are 2D, so list entries with backbone.spatial_dims 2")
        rendered = ((params.get("data") or {}).get("cxr") or {}).get("source", "rendered") == "rendered"
        if key == "study_methods" and named and len(views) == 1 and rendered:
            problems.append(f"pretrain_radiographs.study_methods: studies of the single view {views[0]!r} share "
                            "nothing; list both views in pretrain_radiographs.views or leave study_methods empty")


def _check_radiograph_entries(params: dict, problems: list[str],
                              method_configs: Mapping[str, type[MethodConfig]]) -> None:
    """``pretrain_radiographs.per_entry`` names listed entries and keys they have; and every
    listed entry as trained on radiographs (:func:`radiograph_entry`) holds together: its
    ``train`` block passes :func:`schedule_problems` (e.g. seed 004's 10-epoch warm-up needs
    more than 10 radiograph epochs), its backbone its preset's schema, a ViT's patches tile
    ``radiographs.side``, and its method's config accepts that backbone (``method_configs``)."""
    from chestssl.schema import tags

    block = params.get("pretrain_radiographs")
    methods = params.get("methods") or {}
    if not isinstance(block, Mapping):
        return
    listed = [name for key in ("methods", "study_methods") for name in block.get(key) or []]
    listed = [name for name in dict.fromkeys(listed) if isinstance(methods.get(name), Mapping)]
    size = params["radiographs"]["side"]
    usable = set(listed)
    for name, own in (block.get("per_entry") or {}).items():
        where = f"pretrain_radiographs.per_entry.{name}"
        if name not in listed:
            problems.append(f"{where}: {name!r} is listed in neither pretrain_radiographs.methods nor "
                            "pretrain_radiographs.study_methods; list it there or remove its settings")
            continue
        entry = methods[name]
        if own.get("train") and "train" not in entry:
            problems.append(f"{where}.train: {name!r} is a scratch entry, not trained; remove its `train` keys")
            usable.discard(name)
        backbone = entry.get("backbone") or {}
        for key in own.get("backbone") or {}:
            if key == "img_size" and backbone.get("name") == "vit":
                problems.append(f"{where}.backbone.img_size: a ViT trained on radiographs takes radiographs.side "
                                f"({size}) as its img_size; change radiographs.side instead")
            elif key in RADIOGRAPH_FIXED_BACKBONE_KEYS or key not in backbone:
                allowed = [k for k in backbone if k not in RADIOGRAPH_FIXED_BACKBONE_KEYS]
                problems.append(f"{where}.backbone.{key}: not a key this override may set; the "
                                f"{backbone.get('name')!r} backbone of methods.{name} allows: {', '.join(allowed)}")
            else:
                continue
            usable.discard(name)
    for name in listed:
        entry = methods[name]
        if name not in usable or (entry.get("backbone") or {}).get("spatial_dims") != 2:
            continue  # named above, or by _check_radiograph_pretraining
        where = f"pretrain_radiographs.per_entry.{name}"
        merged = radiograph_entry(params, name, listed_in=None)
        if "train" in merged:
            problems.extend(f"{where}.train.{key}: {message} (the train block of {name!r} on radiographs: its own, "
                            "then pretrain_radiographs.train, then this)"
                            for key, message in schedule_problems(merged["train"]))
        backbone = merged["backbone"]
        if backbone == entry["backbone"]:
            continue  # as checked on CT
        member = tags(Backbone).get(backbone.get("name"))
        try:
            member.model_validate(backbone)
        except ValidationError as error:
            problems.extend(problems_of(error, member, prefix=(*where.split("."), "backbone")))
            continue
        if backbone["name"] == "vit" and size % backbone["patch_size"]:
            own = (block["per_entry"].get(name) or {}).get("backbone") or {}
            source = "" if "patch_size" in own else " (the preset's)"
            problems.append(f"{where}.backbone.patch_size: got {backbone['patch_size']}{source}, which does not "
                            f"divide radiographs.side {size}, the ViT's img_size on radiographs")
            continue
        config = method_configs.get(entry.get("method"))
        if config is None:
            continue
        bare = {key: value for key, value in entry.items() if key not in ("backbone", "train")}
        try:
            found = config.model_validate({**bare, "backbone": name, "recipe": name}).entry_problems(backbone)
        except ValidationError:
            continue  # the entry itself is named by _check_method_inputs
        problems.extend(f"{where}.backbone: with this backbone on radiographs, methods.{name}"
                        + (f".{key}" if key else "") + f": {message}" for key, message in found)


def _check_cross_modal(params: dict, problems: list[str]) -> None:
    """``cross_modal`` names 2D ``dae`` entries, each once, with views to mix in and some CT left."""
    block = params.get("cross_modal")
    if not isinstance(block, Mapping):
        return
    methods = params.get("methods") or {}
    named = block.get("methods") if isinstance(block.get("methods"), list) else []
    views = block.get("views") if isinstance(block.get("views"), list) else []
    for name in sorted({n for n in named if named.count(n) > 1}):
        problems.append(f"cross_modal.methods: {name!r} is listed twice; each is one stage")
    for view in sorted({v for v in views if views.count(v) > 1}):
        problems.append(f"cross_modal.views: {view!r} is listed twice")
    if named and not views:
        problems.append("cross_modal.views: empty; list frontal, lateral or both")
    if named and block.get("radiograph_fraction") == 1.0:
        problems.append("cross_modal.radiograph_fraction: got 1.0, expected a share below 1 (the rest are CT slices)")
    for name in named:
        entry = methods.get(name)
        if not isinstance(entry, Mapping):
            problems.append(f"cross_modal.methods: {name!r} is not an entry under `methods`: " + ", ".join(methods))
        elif entry.get("method") != "dae":
            problems.append(f"cross_modal.methods: {name!r} is a {entry.get('method')!r} entry; list `dae` entries, "
                            "whose loss has the cross-modal contrastive term")
        elif (entry.get("backbone") or {}).get("spatial_dims") != 2:
            problems.append(f"cross_modal.methods: {name!r} has a {(entry.get('backbone') or {}).get('spatial_dims')}D "
                            "backbone; radiographs are 2D, so list entries with backbone.spatial_dims 2")
        elif isinstance(entry.get("mm_con"), (int, float)) and entry["mm_con"] == 0:
            problems.append(f"cross_modal.methods: {name!r} has mm_con 0, so the contrastive term would stay off; "
                            f"set methods.{name}.mm_con > 0 (seed 003: 0.03)")


def _check_epoch_units(params: dict, problems: list[str]) -> None:
    """``epoch_unit`` is written only on trained 2D entries: a 3D entry's epoch is
    ``crops.per_scan`` crops of each scan, and a scratch entry is not trained."""
    for section in PRETRAIN_SECTIONS:
        for name, entry in (params.get(section) or {}).items():
            if "epoch_unit" not in entry:
                continue
            where = f"{section}.{name}.epoch_unit"
            if entry.get("method") == "scratch":
                problems.append(f"{where}: a scratch entry is not trained; remove its epoch_unit")
            elif (entry.get("backbone") or {}).get("spatial_dims") == 3:
                problems.append(f"{where}: got {entry['epoch_unit']!r}, but the entry has a 3D backbone, whose "
                                "epoch is crops.per_scan crops of each training scan (drawn anew with crops.draw: "
                                "every_epoch); epoch_unit counts the slices of 2D entries, so remove it")


def _check_method_inputs(params: dict, problems: list[str],
                         method_configs: Mapping[str, type[MethodConfig]]) -> None:
    """Sizes that must agree with the data a method is fed, and what each method's config
    asks of its backbone (:meth:`MethodConfig.entry_problems`; with ``method_configs``).

    A ViT preset is checked once, against the data of its dimension, and named with the
    entries that use it.
    """
    users: dict[str, list[str]] = {}
    backbones = params.get("backbones") or {}
    for section in PRETRAIN_SECTIONS:
        for name, entry in (params.get(section) or {}).items():
            users.setdefault(entry["backbone"], []).append(f"{section}.{name}")
            config = method_configs.get(entry["method"])
            if config is None:
                continue
            preset = backbones.get(entry["backbone"]) or {}
            where = f"{section}.{name}"
            if config.backbone_names is not None and preset.get("name") not in config.backbone_names:
                problems.append(f"{where}.backbone: {entry['backbone']!r} is a {preset.get('name')!r} backbone, but "
                                f"method {entry['method']!r} needs " + " or ".join(map(repr, config.backbone_names)))
                continue
            for key, message in config.model_validate(entry).entry_problems(preset):
                problems.append(f"{where}.{key}: {message}" if key else f"{where}: {message}")
    for preset, backbone in (params.get("backbones") or {}).items():
        if preset not in users or backbone.get("name") != "vit":
            continue
        used_by = f" (the backbone of {', '.join(users[preset])})"
        three_d = backbone.get("spatial_dims") == 3
        side = params["crops"]["side"] if three_d else params["slices"]["side"]
        source = "crops.side" if three_d else "slices.side"
        if backbone.get("img_size") != side:
            problems.append(
                f"backbones.{preset}.img_size: got {backbone.get('img_size')}, but {source} is {side}; "
                f"the ViT's position embeddings are built for one input size, so set them equal{used_by}"
            )
        elif side % backbone.get("patch_size", 1):
            problems.append(
                f"backbones.{preset}.patch_size: got {backbone.get('patch_size')}, which does not "
                f"divide img_size {side}{used_by}"
            )


#: The sections whose entries name presets, and the references each entry holds.
PRESET_USERS = {"methods": ("backbone", "recipe"), "multihead": ("backbone", "recipe"), "runs": ("recipe",),
                "radiograph_runs": ("recipe",), "runs_3d": ("recipe",), "latent_diffusion": ("recipe",)}


def _resolve_presets(params: dict, problems: list[str]) -> dict:
    """``params`` with each entry's presets filled in: ``backbone: <name>`` becomes a copy
    of ``backbones.<name>``; ``recipe: <name>`` becomes ``train``, a copy of
    ``recipes.<name>`` updated with the entry's own ``train`` keys. Entries then look
    as if written out in full, so their consumers never see a preset name.
    """
    recipes = params.get("recipes") or {}
    backbones = params.get("backbones") or {}
    resolved = dict(params)
    for section, references in PRESET_USERS.items():
        entries = {}
        for name, raw_entry in (params.get(section) or {}).items():
            where = f"{section}.{name}"
            entry = copy.deepcopy(dict(raw_entry))
            if "backbone" in references:
                preset = entry["backbone"]
                if preset in backbones:
                    entry["backbone"] = copy.deepcopy(backbones[preset])
                else:
                    problems.append(f"{where}.backbone: got {preset!r}, expected a name under `backbones`: "
                                    + ", ".join(backbones))
            recipe = entry.pop("recipe")
            untrained = entry.get("method") == "scratch"
            if untrained and recipe != NO_RECIPE:
                problems.append(f"{where}.recipe: got {recipe!r}, but a scratch entry is not trained; "
                                f"set it to {NO_RECIPE!r}")
            elif not untrained and recipe == NO_RECIPE:
                problems.append(f"{where}.recipe: {NO_RECIPE!r} means not trained; name a training recipe under "
                                "`recipes`: " + ", ".join(r for r in recipes if r != NO_RECIPE))
            elif recipe not in recipes:
                problems.append(f"{where}.recipe: got {recipe!r}, expected a name under `recipes`: " + ", ".join(recipes))
            elif untrained and "train" in entry:
                problems.append(f"{where}.train: a scratch entry is not trained; remove its `train` keys")
            elif not untrained:
                entry["train"] = {**copy.deepcopy(recipes[recipe]), **entry.get("train", {})}
                problems.extend(f"{where}.train.{key}: {message}" for key, message in schedule_problems(entry["train"]))
            entries[name] = entry
        resolved[section] = entries
    return resolved


#: The params sections whose entries are pretraining stages (``pretrain@<name>``).
PRETRAIN_SECTIONS = ("methods", "multihead")


def pretrain_entry(params: Mapping[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """``(section, entry)`` of the pretraining entry ``name`` under ``methods`` or ``multihead``.

    A multihead entry whose ``seg_beta`` is null gets the top-level ``seg_beta`` here,
    so the model and its saved config carry the weight that was actually used.
    """
    for section in PRETRAIN_SECTIONS:
        entries = params.get(section) or {}
        if name in entries:
            entry = dict(entries[name])
            if section == "multihead" and entry.get("seg_beta") is None:
                entry["seg_beta"] = float(params["seg_beta"])
            return section, entry
    known = [n for section in PRETRAIN_SECTIONS for n in (params.get(section) or {})]
    raise ParamsError([f"{name!r} is not an entry under `methods` or `multihead` (known: {', '.join(known)})"])


def radiograph_entry(params: Mapping[str, Any], name: str, listed_in: str | None = "methods") -> dict[str, Any]:
    """The ``methods`` entry ``name`` as trained on radiographs (seeds 001, 004).

    Its ``train`` block (none for ``scratch`` entries) takes ``pretrain_radiographs.train``,
    then the entry's own ``pretrain_radiographs.per_entry.<name>.train``; a ViT backbone takes
    ``radiographs.side`` as its ``img_size`` (so radiographs never force the CT's
    ``slices.side``; seed 004: 256 px), then any backbone keys of
    ``pretrain_radiographs.per_entry.<name>.backbone`` (seed 004: ``patch_size`` 32).
    Exported encoders carry this backbone, so their consumers rebuild it from the file.
    The entry's ``epoch_unit`` is left out: it counts CT slices, and a radiograph epoch is
    already one item per study view.

    ``listed_in``: the ``pretrain_radiographs`` list that must name it (``methods``, or
    ``study_methods`` for study-level pretraining; ``None``: not checked).
    """
    block = params["pretrain_radiographs"]
    if listed_in is not None and name not in block[listed_in]:
        raise ParamsError([f"pretrain_radiographs.{listed_in}: {name!r} is not listed "
                           f"({', '.join(block[listed_in]) or 'empty'})"])
    own = (block.get("per_entry") or {}).get(name) or {}
    entry = copy.deepcopy(dict(params["methods"][name]))
    entry.pop("epoch_unit", None)
    if "train" in entry:  # `scratch` entries train nothing
        entry["train"] = {**entry["train"], **block["train"], **(own.get("train") or {})}
    backbone = dict(entry["backbone"])
    if backbone.get("name") == "vit":
        backbone["img_size"] = params["radiographs"]["side"]
    entry["backbone"] = {**backbone, **copy.deepcopy(own.get("backbone") or {})}
    return entry


#: Keys DVC's run-cache leaves out of a stage's identity, at any depth of its params (DVC
#: 3's ``dvc.stage.cache._get_cache_hash`` drops them as file metadata): a stage whose
#: param of such a name changed would be answered with the outputs of the old value.
RUN_CACHE_BLIND_KEYS = ("size", "nfiles")


def run_cache_blind_keys(raw: Any, path: str = "") -> list[str]:
    """One problem per key of ``raw`` (nested mappings and lists) named as one of
    :data:`RUN_CACHE_BLIND_KEYS`; such a key would make ``dvc repro`` and ``dvc exp run``
    restore results made with its earlier value."""
    found = []
    items = raw.items() if isinstance(raw, Mapping) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if key in RUN_CACHE_BLIND_KEYS:
            found.append(f"{where}: DVC's run-cache ignores keys named {key!r}, so a change of it would restore "
                         "results made with the old value; rename it (a side in pixels is `side`)")
        found.extend(run_cache_blind_keys(value, where))
    return found


def validate(raw: Mapping[str, Any], source: str = "params.yaml",
             method_configs: Mapping[str, type[MethodConfig]] | None = None) -> dict[str, Any]:
    """Validate a parsed params mapping; returns it with floats normalised and every
    entry's presets filled in (:func:`_resolve_presets`).

    ``method_configs`` (``{method name: config}``) checks each pretraining entry against
    its method's config (:func:`params_model`); without it, only their shape is checked.

    Raises :class:`ParamsError` listing every problem found.
    """
    problems = run_cache_blind_keys(raw)
    if problems:
        raise ParamsError(problems, source)
    model = params_model(method_configs)
    params = _schema_check(raw, problems, model)
    if not problems:
        checked, params = params, _resolve_presets(params, problems)
    if not problems:
        _check_method_inputs(checked, problems, method_configs or {})  # on the presets, before they are copied
        _cross_checks(params, problems)
        _check_radiograph_entries(params, problems, method_configs or {})
    if problems:
        raise ParamsError(problems, source)
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (DVC refuses such a
    file too; the plain loader would silently keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                    "keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content (safe types only); a syntax error or a duplicate key is a
    :class:`ParamsError` naming the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found" + ("; it is a folder" if path.is_dir() else ""))
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ParamsError([f"{where}{problem}; fix the YAML (a DVC command would refuse it too)"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ParamsError([f"not UTF-8 text ({exc})"], str(path)) from None


#: The params files besides ``params.yaml`` (paths relative to its folder) and the groups
#: each holds. DVC parses a params file once for every stage that reads a key from it, so
#: the large groups live in files of their own and a stage parses only those it reads
#: (dvc.yaml names them under ``vars`` and in the stages' ``params``).
PARAMS_FILES: dict[str, tuple[str, ...]] = {
    "params/presets.yaml": ("recipes", "backbones"),
    "params/methods.yaml": ("methods", "latent_diffusion"),
    "params/multihead.yaml": ("multihead",),
    "params/runs.yaml": ("runs", "radiograph_runs", "runs_3d"),
    "params/radiographs.yaml": ("pretrain_radiographs", "cross_modal", "alignment"),
    "params/ablations.yaml": ("label_fraction", "frozen_parts"),
    "params/report.yaml": ("report",),
}


def params_file_of(group: str) -> str:
    """The params file (relative to the repository root) that holds the top-level ``group``."""
    for name, groups in PARAMS_FILES.items():
        if group in groups:
            return name
    return "params.yaml"


def read_raw_params(path: str | os.PathLike = "params.yaml") -> tuple[dict[str, Any], dict[str, str]]:
    """The params files as written, merged into one mapping, and the file of each group.

    ``path`` is ``params.yaml``; the files of :data:`PARAMS_FILES` are read from its
    folder. A missing file, a group in the wrong file or in two files is a
    :class:`ParamsError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run stages from the repository root")
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in ["params.yaml", *PARAMS_FILES]:
        file = path if name == "params.yaml" else path.parent / name
        if not file.exists():
            raise FileNotFoundError(f"{file} not found; it holds {', '.join(PARAMS_FILES[name])} "
                                    f"(a params file next to {path.name})")
        raw = read_yaml(file)
        if raw is not None and not isinstance(raw, Mapping):
            raise ParamsError([f"the file holds a {type(raw).__name__}, expected a mapping of keys to values"], str(file))
        for group, value in (raw or {}).items():
            home = params_file_of(str(group))
            if home != name:
                raise ParamsError([f"{group}: this group belongs in {home} (dvc.yaml reads it there); move it"],
                                  str(file))
            merged[group] = value
            sources[group] = name
    return merged, sources


def write_raw_params(raw: Mapping[str, Any], path: str | os.PathLike = "params.yaml") -> None:
    """Write a merged params mapping back to ``params.yaml`` and :data:`PARAMS_FILES`
    (plain YAML, without comments: for generated projects and tests)."""
    from chestssl.io import write_text

    path = Path(path)
    for name in ["params.yaml", *PARAMS_FILES]:
        file = path if name == "params.yaml" else path.parent / name
        part = {group: value for group, value in raw.items() if params_file_of(group) == name}
        file.parent.mkdir(parents=True, exist_ok=True)
        write_text(file, yaml.safe_dump(part, sort_keys=False))


def load_params(path: str | os.PathLike = "params.yaml",
                method_configs: Mapping[str, type[MethodConfig]] | None = None) -> dict[str, Any]:
    """Read and validate ``params.yaml`` and the params files next to it (:data:`PARAMS_FILES`);
    ``method_configs`` as in :func:`validate`."""
    raw, sources = read_raw_params(path)
    try:
        return validate(raw, str(path), method_configs)
    except ParamsError as exc:
        raise _locate(exc.problems, sources, Path(path)) from None


def _locate(problems: list[str], sources: Mapping[str, str], main: Path) -> ParamsError:
    """The error with each problem's file: the one holding the group its key starts with."""
    def file_of(problem: str) -> str:
        group = re.split(r"[.:\[ ]", problem, maxsplit=1)[0]
        name = sources.get(group, "params.yaml")
        return str(main) if name == "params.yaml" else str(main.parent / name)

    files = [file_of(p) for p in problems]
    if len(set(files)) == 1:
        return ParamsError(problems, files[0])
    return ParamsError([f"{file}: {problem}" for file, problem in zip(files, problems)], "the params files")
