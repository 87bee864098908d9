"""Stages latent_diffusion@<name>, fid_reference and evaluate_latent_diffusion@<name>: train, sample, FID."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from chestssl.model_files import ModelFileError, load_model_file, save_model_file
from chestssl.methods import build_method
from chestssl.params import pretrain_entry
from chestssl.pipeline.evaluate_latent_diffusion import evaluate_latent_diffusion
from chestssl.pipeline.fid_reference import FeatureNetworkError, embed_reference, load_reference
from chestssl.pipeline.latent_diffusion import train_latent_diffusion
from tests.pipeline.test_pretrain import stage_params


def _saved(params: dict, name: str, path, stage: str = "method") -> None:
    """``method.pt`` (or ``encoder.pt``) as ``pretrain@<name>`` writes it, of the untrained method."""
    _, cfg = pretrain_entry(params, name)
    method = build_method(name, cfg, params["seed"])
    payload = (method.export() if stage == "encoder"
               else {"name": name, "config": cfg, "state_dict": method.state_dict()})
    save_model_file(path, payload)


@pytest.fixture
def trained(synthetic_processed, tmp_path, monkeypatch):
    """The DDPM of ae_cnn_attention trained for 3 steps, in a project folder at tmp_path."""
    monkeypatch.chdir(tmp_path)
    params = stage_params(methods=("ae_cnn_attention", "barlow_twins"))
    _saved(params, "ae_cnn_attention", tmp_path / "models/pretrain/ae_cnn_attention/method.pt")
    _saved(params, "barlow_twins", tmp_path / "models/pretrain/barlow_twins/encoder.pt", stage="encoder")
    metrics = train_latent_diffusion(params, "ae_cnn_attention", synthetic_processed)
    return params, metrics


def test_training_writes_the_model_with_its_autoencoder_the_curves_and_the_cost(trained, tmp_path):
    params, metrics = trained
    # 24 training slices, batch 8, at most 3 steps; the latents scaled to unit spread.
    assert metrics["steps"] == 3 and metrics["epochs"] == 1 and metrics["scale_factor"] > 0
    report = tmp_path / "reports/latent_diffusion/ae_cnn_attention"
    assert json.loads((report / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert json.loads((report / "cost.json").read_text())["steps"] == 3
    assert (report / "live/plots/metrics/train/loss.tsv").is_file()
    saved = load_model_file(tmp_path / "models/latent_diffusion/ae_cnn_attention/model.pt", "test",
                            required=("state_dict", "scale_factor"))
    assert saved["config"] == params["latent_diffusion"]["ae_cnn_attention"]
    assert saved["scale_factor"] == metrics["scale_factor"]
    assert any(key.startswith("autoencoder.") for key in saved["state_dict"])


def test_evaluation_scores_the_samples_by_fid_on_the_named_encoder(trained, synthetic_processed, tmp_path):
    params, _ = trained
    with pytest.raises(FileNotFoundError, match=r"run `dvc repro fid_reference`"):
        evaluate_latent_diffusion(params, "ae_cnn_attention", synthetic_processed)
    summary = embed_reference(params, synthetic_processed)
    assert (summary["slices"], summary["patients"]) == (24, 2) and "barlow_twins" in summary["feature_network"]
    reference = load_reference()
    assert reference["features"].dtype == np.float32 and reference["features"].shape[0] == 24
    metrics = evaluate_latent_diffusion(params, "ae_cnn_attention", synthetic_processed)
    fid = metrics["fid"]
    # 8 samples (the tiny entry) against every slice of the two test patients.
    assert (fid["n_generated"], fid["n_real"]) == (8, 24) and fid["value"] > 0
    assert fid["ci_low"] <= fid["value"] <= fid["ci_high"]
    assert "barlow_twins" in metrics["feature_network"] and metrics["sampler"] == "ddim"
    assert metrics["sampling_steps"] == 3 and metrics["image_size"] == 32 and metrics["n_patients"] == 2
    out = tmp_path / "reports/evaluate_latent_diffusion/ae_cnn_attention"
    with np.load(out / "samples.npz") as samples:
        assert samples["generated"].shape == samples["real"].shape == (8, 1, 32, 32)
        assert samples["generated"].min() >= 0 and samples["generated"].max() <= 1
        assert list(samples["patient_id"][[0, -1]]) == ["p4", "p5"]
    # Sampling is seeded: a second evaluation gives the same bytes.
    again = evaluate_latent_diffusion(params, "ae_cnn_attention", synthetic_processed,
                                      out_dir=tmp_path / "again")
    assert again == metrics


def test_a_torchscript_feature_network_is_used_once_its_hash_matches(trained, synthetic_processed, tmp_path):
    params, _ = trained
    network = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1)))
    path = tmp_path / "features.pt"
    network.save(str(path))
    embed_reference(params, synthetic_processed)  # on the default `fid.features`
    params["fid"].update(network=str(path), network_sha256="0" * 64, network_size=24)
    with pytest.raises(FeatureNetworkError, match=r"features\.pt has SHA-256 [0-9a-f]{64}, but fid\.network_sha256"):
        embed_reference(params, synthetic_processed)
    params["fid"]["network_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    # The reference still holds the encoder's features: the evaluation refuses to mix networks.
    with pytest.raises(ValueError, match=r"was embedded with the frozen `barlow_twins` encoder .* rerun the stage "
                                         r"fid_reference"):
        evaluate_latent_diffusion(params, "ae_cnn_attention", synthetic_processed)
    embed_reference(params, synthetic_processed)
    metrics = evaluate_latent_diffusion(params, "ae_cnn_attention", synthetic_processed)
    assert metrics["fid"]["features"] == 4 and "TorchScript network features.pt" in metrics["feature_network"]
    path.write_bytes(b"not a network")
    params["fid"]["network_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(FeatureNetworkError, match="is not a TorchScript file"):
        embed_reference(params, synthetic_processed)


def test_a_missing_autoencoder_names_the_stage_that_writes_it(synthetic_processed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFileError, match=r"rerun `dvc repro pretrain@ae_cnn_attention`"):
        train_latent_diffusion(stage_params(), "ae_cnn_attention", synthetic_processed)
