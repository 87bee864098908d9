"""Seed 000's generation table (FID) and the samples figure."""

from __future__ import annotations

import numpy as np
import pytest

from chestssl.report.generation import generation_figure, generation_table

ROWS = [{"seed_row": "swin-transformer", "latent_diffusion": "ae_swin"},
        {"seed_row": "cnn-attention", "latent_diffusion": None}]
METRICS = {"fid": {"value": 41.234, "ci_low": 38.0, "ci_high": 47.5, "n_generated": 256, "n_real": 2615,
                   "features": 128},
           "feature_network": "the frozen `barlow_twins` encoder (resnet18), globally pooled",
           "sampler": "ddim", "sampling_steps": 50, "image_size": 64, "n_patients": 20}


def test_each_row_quotes_the_seed_and_states_our_protocol():
    table = generation_table(ROWS, {"ae_swin": (METRICS, "m.json")}, "synthetic phantom CT, 64x64 slices")
    ours = table.text.set_index("Experiment")
    assert ours.loc["swin-transformer", "FID (ours)"] == "41.23 [38.00, 47.50]"
    assert ours.loc["swin-transformer", "FID, seed 000 [^1]"] == "15.41"
    protocol = ours.loc["swin-transformer", "Protocol (ours)"]
    assert "barlow_twins" in protocol and "256 samples vs 2615 test slices of 20 patients" in protocol
    assert "ddim, 50 steps; 64x64" in protocol
    assert ours.loc["cnn-attention", "FID (ours)"] == "not run" and ours.loc["cnn-attention", "FID, seed 000 [^1]"] == "23.11"
    assert table.footnotes[0].startswith("Not comparable with the seed's numbers")
    assert "Inception-v3" in table.footnotes[0] and "synthetic phantom CT" in table.footnotes[0]
    numbers = table.numbers.set_index("experiment")
    assert numbers.loc["swin-transformer", "fid"] == 41.234 and not numbers.loc["cnn-attention", "available"]


def test_costs_come_from_the_latent_diffusion_stage():
    cost = {"parameters": 1000, "trainable_parameters": 800, "steps": 320, "epochs": 10, "train_seconds": 61.0,
            "peak_memory_gb": 1.1, "memory_kind": "process_max_rss", "device": "cpu", "processes": 1}
    table = generation_table(ROWS, {"ae_swin": (METRICS, "m.json")}, "phantom", {"latent_diffusion@ae_swin": cost})
    assert table.numbers.set_index("experiment").loc["swin-transformer", "steps"] == 320


def test_a_row_the_seed_does_not_have_is_named():
    with pytest.raises(KeyError, match="seed_row 'vit' is not a row of the seed's table"):
        generation_table([{"seed_row": "vit", "latent_diffusion": None}], {}, "phantom")


def test_the_figure_shows_real_slices_then_each_models_samples(tmp_path):
    rng = np.random.default_rng(0)
    samples = {name: {"generated": rng.random((8, 1, 16, 16)), "real": rng.random((8, 1, 16, 16))}
               for name in ("ae_swin", "ae_cnn_attention")}
    path = generation_figure(tmp_path / "samples.png", samples)
    assert path.is_file() and path.stat().st_size > 1000
