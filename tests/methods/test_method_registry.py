"""build_method: one registry keyed by `method`, matching the params schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chestssl.methods import METHODS, PretrainMethod, build_method
from chestssl.models import load_encoder
from chestssl.params import load_params, pretrain_entry

ROOT = Path(__file__).resolve().parents[2]


def test_the_registry_and_the_params_check_follow_the_method_classes():
    from chestssl.methods import STUDY_LEVEL, method_configs
    from chestssl.params import method_kind

    # the seeds' methods at least; a new method module adds itself
    assert set(METHODS) >= {"scratch", "ae", "vqgan", "multihead", "dae", "barlow_twins", "mae", "diffmae"}
    assert set(STUDY_LEVEL) == {"mae", "diffmae"}
    for name, cls in METHODS.items():
        assert issubclass(cls, PretrainMethod) and method_kind(cls.Config) == name
    assert method_configs()["multihead"].section == "multihead"


def test_unknown_method_names_allowed():
    with pytest.raises(ValueError, match=r"mine: unknown method 'simclr'; known: .*'scratch'"):
        build_method("mine", {"method": "simclr"}, seed=0)


def test_every_method_of_params_yaml_builds_and_exports():
    params = load_params(ROOT / "params.yaml")
    for name in [*params["methods"], *params["multihead"]]:
        cfg = pretrain_entry(params, name)[1]
        dims = cfg["backbone"]["spatial_dims"]
        x = torch.rand(1 if dims == 3 else 2, 1, *[64] * dims)
        method = build_method(name, cfg, seed=params["seed"])
        assert method.trainable == METHODS[cfg["method"]].trainable
        encoder = load_encoder(method.export()).eval()
        with torch.no_grad():
            latent = encoder.latent(x)
        stride = encoder.latent_stride
        assert tuple(latent.shape) == (x.shape[0], encoder.latent_channels, *[64 // stride] * dims), name


def test_reconstructs_says_whether_reconstruct_returns_images():
    import torch

    from chestssl.methods import METHODS, build_method
    from chestssl.params import load_params

    from pathlib import Path

    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml")
    for name in [*params["methods"], *params["multihead"]]:
        cfg = pretrain_entry(params, name)[1]
        image = torch.rand(1, 1, *[64] * cfg["backbone"]["spatial_dims"])
        method = build_method(name, cfg, seed=0).eval()
        assert (method.reconstruct(image) is not None) == type(method).reconstructs, name
    assert set(METHODS) >= {"scratch", "ae"}
