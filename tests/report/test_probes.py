"""The linear-probe table of the report."""

from chestssl.report.probes import NO_SEED_NUMBER, linear_probe_table


def _interval(value):
    return {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.05}


def _probe(nodule_auroc, malignant_skipped=False):
    nodule = {"auroc": _interval(nodule_auroc), "auprc": _interval(0.6), "f1": _interval(0.5),
              "n_images": 40, "n_patients": 4}
    malignant = ({"skipped": "only one class in the test split"} if malignant_skipped else
                 {"auroc": _interval(0.7), "auprc": _interval(0.3), "f1": _interval(0.2), "n_images": 40,
                  "n_patients": 4})
    return {"nodule": nodule, "malignant": malignant, "mean": {"auroc": nodule_auroc}}


ENTRIES = {
    "mae": {"method": "mae", "backbone": {"name": "vit", "spatial_dims": 2}},
    "dae_all_3d": {"method": "dae", "backbone": {"name": "swin", "spatial_dims": 3}},
    "ae": {"method": "ae", "backbone": {"name": "unet_encoder", "spatial_dims": 2}},
}


def test_one_row_per_probed_entry_with_the_seed_number_beside_ours():
    table = linear_probe_table(
        {"mae": ({"probe": _probe(0.81)}, "m.json"), "dae_all_3d": ({"probe": _probe(0.6, True)}, "d.json"),
         "ae": ({"reconstructs": True}, "a.json")},
        ENTRIES,
    )
    assert list(table.numbers["entry"]) == ["mae", "dae_all_3d"], "entries without a probe are left out"
    mae, dae = table.text.iloc[0], table.text.iloc[1]
    assert mae["nodule AUROC"] == "0.810 [0.710, 0.860]"
    assert "0.686" in mae["seed's number (other data)"]
    assert dae["backbone"] == "swin 3D" and dae["seed's number (other data)"] == NO_SEED_NUMBER
    assert dae["malignancy >= 4 AUROC"].startswith("n/a")
    assert any("only one class" in note for note in table.footnotes)
    assert table.numbers.loc[0, "nodule_auroc_ci_low"] == 0.81 - 0.1
    assert "| mae | mae | vit 2D |" in table.markdown()
