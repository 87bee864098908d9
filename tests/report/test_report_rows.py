"""The params group ``report`` says which entry each seed table row and figure model shows."""

from __future__ import annotations

from pathlib import Path

from chestssl.params import validate
from chestssl.report.pipeline import figure_models
from chestssl.report.seed000 import ENTRY_HEADER, seed000_tables
from tests.report.test_seed000 import DATASET, _seg
from tests.shipped_params import read_shipped_params

ROOT = Path(__file__).resolve().parents[2]


def _renamed_run(raw: dict, old: str, new: str) -> None:
    """Rename the run ``old`` to ``new`` in ``runs`` and in every ``report`` row naming it, in place."""
    raw["runs"] = {(new if name == old else name): run for name, run in raw["runs"].items()}
    for rows in raw["report"].values():
        for row in rows if isinstance(rows, list) else []:
            if row.get("run") == old:
                row["run"] = new


def test_a_renamed_run_moves_into_the_seed_table_and_the_figure():
    raw = read_shipped_params()
    _renamed_run(raw, "seg_unetpp_scratch", "unetpp_from_scratch")
    params = validate(raw)

    tables = seed000_tables(params["report"], {}, {"unetpp_from_scratch": _seg(0.8, 0.6)}, DATASET)
    table = next(table for table in tables if table.name == "seed000_pretrained_segmentation")
    first = table.text.iloc[0]
    assert (first["Experiment"], first["Pretrained"]) == ("UNet++", "False")
    assert first[ENTRY_HEADER] == "`unetpp_from_scratch`" and first["Dice (global)"] == "0.800 [0.750, 0.850]"
    assert table.numbers.loc[0, "entry"] == "unetpp_from_scratch"

    models = figure_models(params["report"]["segmentation_comparison"])
    assert models[0] == ("UNet++ scratch", "run", "unetpp_from_scratch")


def test_figure_models_are_the_params_rows_in_order():
    raw = read_shipped_params()
    raw["report"]["feature_maps"].insert(0, {"label": "SwinUNETR scratch (soft Dice)", "run": "seg_swinunetr_scratch_dice"})
    params = validate(raw)
    assert figure_models(params["report"]["feature_maps"]) == [
        ("SwinUNETR scratch (soft Dice)", "run", "seg_swinunetr_scratch_dice"),
        ("downstream SwinUNETR (soft Dice)", "run", "seg_swinunetr_swin_dice"),
        ("multihead (seg)", "multihead", "multihead_seg"),
    ]
