"""A throwaway copy of the project in its own git repository, for real `dvc` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chestssl.cost import copy_project_files
from chestssl.params import read_raw_params, write_raw_params
from chestssl.profiles import apply_profile
from tests.tiny_configs import shrink_params

REPO_ROOT = Path(__file__).resolve().parents[2]


#: The entries the tiny profile keeps: one of each kind of stage (a scratch baseline, an
#: autoencoder, Barlow Twins, diffusion MAE, a 2D and a 3D disruptive autoencoder, a
#: multihead model; UNet++ and SwinUNETR segmentation,
#: latent-ResNet and linear classification). Each method's own code is unit-tested in
#: tests/methods; here only the wiring of the stages is.
TINY_METHODS = ("scratch_cnn_attention", "ae_cnn_attention", "barlow_twins", "diffmae", "dae_all")
#: A 3D entry (seed 003's protocol on crops), made from ``dae_all``, and its scratch twin.
TINY_3D_METHOD = "dae_all_3d"
TINY_3D_SCRATCH = "scratch_swin_3d"
TINY_MULTIHEAD = ("multihead_clsseg",)
#: Each run: its shipped entry, or the entry named by ``from`` (else a SwinUNETR one) with changes.
TINY_RUNS = {
    "seg_unetpp_scratch": {},
    "seg_unetpp_cnn_attention": {},
    "seg_swinunetr_multihead": {"task": "seg", "arch": "swin_unetr", "init": "multihead_clsseg", "loss": "dice"},
    "cls_resnet18_cnn_attention": {"from": "cls_resnet18_swin", "init": "ae_cnn_attention"},
    "cls_linear_barlow_twins": {},
    "cls_linear_diffmae": {},
}


def tiny_params(params: dict) -> dict:
    """The quick profile shrunk further: 8 small phantom scans, a few entries, a few steps.

    Slices stay 64x64: the Swin encoder divides by 32 and SwinUNETR's deepest instance
    norm needs more than one element.
    """
    # The drawn anatomy renders in half the time of the real-CT one and needs no base CT in
    # the copy; the default anatomy is tested in tests/data/test_ct_anatomy.py and by `make reproduce`.
    params["data"]["phantom"].update(num_scans=8, max_slices=100, anatomy="geometric", workers=1)
    params["preprocess"].update(spacing=[2.5, 2.0, 2.0], min_nodule_pixels=4, workers=1)
    # Half the scans to training (4 patients): the quick profile's larger test share would leave two.
    params["preprocess"]["split"].update(train=0.5, val=0.25, test=0.25)
    params["methods"] = {name: params["methods"][name] for name in TINY_METHODS}
    # Windows of 4^3 tokens, not 7^3: the 3D stages then take 1.3 GB, not 1.8, and half the time.
    params["backbones"]["swin_3d"] = {**params["backbones"]["swin"], "spatial_dims": 3, "window_size": 4}
    params["methods"][TINY_3D_METHOD] = {**params["methods"]["dae_all"], "backbone": "swin_3d"}
    params["methods"][TINY_3D_SCRATCH] = {"method": "scratch", "backbone": "swin_3d", "recipe": "none"}
    params["crops"].update(side=64, per_scan=2)
    params["multihead"] = {name: params["multihead"][name] for name in TINY_MULTIHEAD}
    params["latent_diffusion"] = {name: entry for name, entry in params["latent_diffusion"].items()
                                  if name in TINY_METHODS}
    for entry in params["multihead"].values():
        # Cross-entropy has a gradient on slices without nodule pixels (a soft Dice over a
        # nodule-free batch has almost none), so seg_beta changes the weights in 3 steps.
        entry["seg_loss"] = "ce"
    template_runs = params["runs"]
    params["runs"] = {}
    for name, override in TINY_RUNS.items():
        override = dict(override)
        template = name if name in template_runs else override.pop("from", "seg_swinunetr_swin_dice")
        params["runs"][name] = {**template_runs[template], **override}
    shrink_params(params)
    # Three levels, not two: the autoencoder's attention then spans 16x16 latents, not 32x32
    # (a sixteenth of the cost; its training and validation took 13 s of 3 steps).
    params["backbones"]["cnn_attention"]["channel_multipliers"] = [1, 2, 2]
    for entry in params["methods"].values():
        if "decoder" in entry:
            entry["decoder"]["channel_multipliers"] = [1, 2, 2]
    # One 64^3 crop per step: two take 2.3 GB through the 3D Swin on CPU.
    params["methods"][TINY_3D_METHOD]["train"].update(batch_size=1, max_steps=2)
    # Seed 003's downstream (runs_3d, both shipped runs): one 64^3 crop per step, two steps, and
    # windows without overlap over the lung box of each of the two test scans.
    for run in params["runs_3d"].values():
        run["train"].update(epochs=2, batch_size=1, max_steps=2)
        run.update(crops_per_scan=1, overlap=0.0, region="lung_box", max_test_scans=2)
    # Seed 001's ablations on one linear-head run, two settings each, on CT slices and on radiographs.
    params["label_fraction"].update(fractions=[0.5, 1.0], runs=["cls_linear_barlow_twins"],
                                    radiograph_runs=["cxr_linear_barlow_twins"])
    params["frozen_parts"] = {"unfrozen_stages": [0, 2], "runs": ["cls_linear_barlow_twins"],
                              "radiograph_runs": ["cxr_linear_barlow_twins"]}
    # Seeds 001 and 004 on the rendered radiographs: Barlow Twins and diffusion MAE, the latter also on studies.
    params["pretrain_radiographs"].update(methods=["barlow_twins", "diffmae"], study_methods=["diffmae"],
                                          train={"epochs": 2, "batch_size": 8})
    params["alignment"].update(block_inplanes=[4, 8, 8, 16], steps=4, batch_size=4, num_examples=2)
    # Seeds 001 and 002 fine-tuned on them: a linear head on Barlow Twins, DenseNet-121 on aligned images.
    params["radiograph_runs"] = {name: params["radiograph_runs"][name]
                                 for name in ("cxr_linear_barlow_twins", "cxr_densenet121_aligned")}
    for entry in params["radiograph_runs"].values():
        entry["train"] = {"epochs": 2, "batch_size": 4}
    params["evaluate"]["bootstrap_samples"] = 50
    params["evaluate"]["num_examples"] = 2
    return params


class Project:
    """A copy of the project at ``root`` with methods that run git and dvc in it."""

    def __init__(self, root: Path):
        self.root = root
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
                    "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.org",
                    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.org", "MPLBACKEND": "Agg",
                    # Stages import the copy's chestssl (the code DVC hashes), not an editable install's.
                    "PYTHONPATH": str(root),
                    # One thread per stage, as the unit tests beside it use (tests/conftest.py):
                    # the tiny models gain nothing from two, and the two test workers share 2 cores.
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.dvc = [str(Path(bindir) / "dvc")]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def dvc_run(self, *args: str, check: bool = True, preload: bool | None = None) -> subprocess.CompletedProcess:
        """``dvc <args>``; a ``repro`` or ``exp run`` under ``python -m chestssl.preload run``
        (as ``make reproduce`` runs it) unless ``preload`` is False."""
        if preload is None:
            preload = args[:1] == ("repro",) or args[:2] == ("exp", "run")
        wrapper = [sys.executable, "-m", "chestssl.preload", "run", "--"] if preload else []
        return self.run(*wrapper, *self.dvc, *args, check=check)

    def params(self) -> dict:
        return read_raw_params(self.root / "params.yaml")[0]

    def write_params(self, params: dict) -> None:
        write_raw_params(params, self.root / "params.yaml")

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-qm", message)


def make_project(root: Path) -> Project:
    root.mkdir(parents=True, exist_ok=True)
    copy_project_files(REPO_ROOT, root)
    project = Project(root)
    project.run("git", "init", "-q")
    project.dvc_run("init", "-q", "--force")
    shutil.copy2(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    # Every entry of the seeds' tables first, as a user adds them; the tiny profile picks among them.
    apply_profile(root / "params" / "all-entries.yaml", root / "params.yaml")
    project.write_params(tiny_params(project.params()))
    project.commit("tiny project")
    return project


@pytest.fixture(scope="module")
def reproduced_project(tmp_path_factory) -> Project:
    """The tiny project after one full `dvc repro`, committed."""
    project = make_project(tmp_path_factory.mktemp("pipeline") / "project")
    project.dvc_run("repro")
    project.commit("reproduced")
    return project
