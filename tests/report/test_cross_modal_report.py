"""The report's tables of the DAE's cross-modal contrastive term."""

import json

from chestssl.report.cross_modal import contrastive_activity, cross_modal_tables, read_cross_modal_metrics
from tests.report.test_probes import _probe

ENTRIES = {"dae_all": {"method": "dae", "backbone": {"name": "swin", "spatial_dims": 2}}}


def _write(folder, labels, radiograph_probe):
    folder.mkdir(parents=True)
    metrics = {
        "steps": 30, "mm_con_active_steps": 28, "labels": labels,
        "items": {"train": {"ct": 120, "radiograph": 40, "radiographs": 16}},
        "probe": {"cross_modal": {"ct": _probe(0.75), "radiograph": radiograph_probe(0.9)},
                  "ct_only": {"ct": _probe(0.7), "radiograph": radiograph_probe(0.6)}},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_two_rows_per_entry_in_a_ct_and_a_radiograph_table(tmp_path):
    _write(tmp_path / "dae_all", ["nodule", "malignant"], _probe)
    crossed = read_cross_modal_metrics(["dae_all"], lambda name: tmp_path / name)
    assert crossed["dae_all"][1] == str(tmp_path / "dae_all" / "metrics.json")
    tables, skipped = cross_modal_tables(crossed, ENTRIES)
    assert skipped == [] and [table.name for table in tables] == ["cross_modal_probe_ct", "cross_modal_probe_radiographs"]
    ct, radiograph = tables
    assert list(ct.numbers["entry"]) == ["dae_all (CT only)", "dae_all + radiographs"]
    assert list(ct.numbers["nodule_auroc"]) == [0.7, 0.75]
    assert list(radiograph.numbers["nodule_auroc"]) == [0.6, 0.9]
    assert "malignancy >= 4 AUROC" in radiograph.text.columns  # rendered labels keep the CT headers


def test_a_datasets_labels_head_the_radiograph_table(tmp_path):
    def findings(auroc):
        interval = {"value": auroc, "ci_low": auroc - 0.1, "ci_high": auroc}
        result = {"auroc": interval, "auprc": interval, "f1": interval, "n_images": 9, "n_patients": 3}
        return {"COVID": result, "Normal": result, "mean": {"auroc": auroc}}

    _write(tmp_path / "dae_all", ["COVID", "Normal"], findings)
    _, radiograph = cross_modal_tables(read_cross_modal_metrics(["dae_all"], lambda name: tmp_path / name),
                                       ENTRIES)[0]
    assert list(radiograph.numbers["COVID_auroc"]) == [0.6, 0.9] and "Normal AUROC" in radiograph.text.columns


def test_an_empty_list_is_reported_as_skipped_and_the_activity_is_counted(tmp_path):
    assert cross_modal_tables(read_cross_modal_metrics([], lambda name: tmp_path / name), ENTRIES) == (
        [], ["Cross-modal contrastive term: `cross_modal.methods` is empty."])
    _write(tmp_path / "dae_all", ["nodule", "malignant"], _probe)
    sentence = contrastive_activity(read_cross_modal_metrics(["dae_all"], lambda name: tmp_path / name))
    assert "acted in 28 of 30 training steps" in sentence and "120 CT slices and 40 radiograph items" in sentence


def test_each_row_shows_the_cost_of_training_its_encoder(tmp_path):
    """CT only: pretrain@<entry>; + radiographs: pretrain_cross_modal@<entry>; n/a without a cost file."""
    _write(tmp_path / "dae_all", ["nodule", "malignant"], _probe)
    crossed = read_cross_modal_metrics(["dae_all"], lambda name: tmp_path / name)
    costs = {"pretrain@dae_all": {"parameters": 1000, "steps": 30, "train_seconds": 10.0, "peak_memory_gb": 0.5},
             "pretrain_cross_modal@dae_all": {"parameters": 1000, "steps": 45, "train_seconds": 20.0,
                                              "peak_memory_gb": 0.75}}
    tables, _ = cross_modal_tables(crossed, ENTRIES, costs)
    for table in tables:
        assert list(table.numbers["entry"]) == ["dae_all (CT only)", "dae_all + radiographs"]
        assert table.numbers["steps"].tolist() == [30, 45] and table.numbers["peak_memory_gb"].tolist() == [0.5, 0.75]
        assert any("`pretrain@<entry>` (CT only) or `pretrain_cross_modal@<entry>`" in note for note in table.footnotes)
        assert any(column.startswith("Parameters[^cross-modal-probe-") for column in table.text.columns)
    tables, _ = cross_modal_tables(crossed, ENTRIES, {"pretrain@dae_all": costs["pretrain@dae_all"]})
    assert tables[0].text["Steps"].tolist() == ["30", "n/a"]
    assert "steps" not in cross_modal_tables(crossed, ENTRIES)[0][0].numbers
