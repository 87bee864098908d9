"""The report's differences from the seeds' protocols, computed from the params in force.

Checked on the shipped params (the quick profile) and on the shipped params with
``params/lidc-full.yaml`` applied (the seeds' protocol): the points that the full profile
brings to the seeds' settings must flip to *same*, the others must stay *no*, and a
changed key must change its row.
"""

from __future__ import annotations

import copy
import shutil

import pandas as pd
import pytest

from chestssl.params import load_params, validate
from chestssl.profiles import apply_profile, params_with_profile
from chestssl.report import build_report
from chestssl.report.protocol_differences import Difference, protocol_differences
from tests.shipped_params import ROOT, read_shipped_params
from tests.tiny_configs import drop_radiograph_runs_of_absent_encoders

FULL_PROFILE = ROOT / "params" / "lidc-full.yaml"


@pytest.fixture(scope="module")
def default_raw() -> dict:
    return read_shipped_params()


@pytest.fixture(scope="module")
def full_raw() -> dict:
    """The full profile applied in memory, as ``python -m chestssl.profiles`` applies it."""
    return params_with_profile(FULL_PROFILE, ROOT / "params.yaml")


@pytest.fixture(scope="module")
def default(default_raw) -> list[Difference]:
    return protocol_differences(validate(copy.deepcopy(default_raw)))


@pytest.fixture(scope="module")
def full(full_raw) -> list[Difference]:
    return protocol_differences(validate(copy.deepcopy(full_raw)))


def _row(differences: list[Difference], seed: str, topic: str) -> Difference:
    rows = [d for d in differences if d.seed == seed and d.topic == topic]
    assert len(rows) == 1, f"expected one row ({seed}, {topic}), got {rows}"
    return rows[0]


def _topics(differences: list[Difference]) -> set[tuple[str, str]]:
    return {(d.seed, d.topic) for d in differences}


def _changed(raw: dict, change) -> list[Difference]:
    raw = copy.deepcopy(raw)
    change(raw)
    return protocol_differences(validate(raw))


def test_every_row_is_one_short_sentence_each_side(default, full):
    for difference in [*default, *full]:
        assert difference.seed in {"000", "001", "002", "003", "004", "all"}
        assert isinstance(difference.matches, bool)
        for text in (difference.seed_protocol, difference.ours):
            assert text.endswith(".") and text.count(". ") == 0 and "\n" not in text, text
    assert len(_topics(default)) == len(default) and len(_topics(full)) == len(full)


def test_seed003_schedule_matches_under_the_full_profile_only(default, full):
    quick = _row(default, "003", "learning-rate schedule")
    assert not quick.matches
    assert "AdamW 5e-4, no warm-up, cosine to 0" in quick.ours
    seeds = _row(full, "003", "learning-rate schedule")
    assert seeds.matches
    assert "warm-up 4 epochs" in seeds.ours and "cosine to 1e-5" in seeds.ours and "AdamW 1e-4" in seeds.ours


def test_seed003_schedule_follows_the_recipe_keys(full_raw):
    for key, value in (("min_lr", 0.0), ("warmup_epochs", 2.0)):
        def change(raw, key=key, value=value):
            raw["recipes"]["dae"][key] = value
        assert not _row(_changed(full_raw, change), "003", "learning-rate schedule").matches, key


def test_seed004_schedule_is_a_five_percent_warm_up(default, full, full_raw):
    assert not _row(default, "004", "learning-rate schedule").matches
    row = _row(full, "004", "learning-rate schedule")
    assert row.matches and "warm-up 10 of 200 epochs (5%)" in row.ours

    def longer(raw):
        raw["recipes"]["mae"]["epochs"] = 400  # the same 10-epoch warm-up is now 2.5%
    assert not _row(_changed(full_raw, longer), "004", "learning-rate schedule").matches


def test_3d_points_appear_only_with_a_3d_dae_entry(default_raw, default, full):
    def without_3d_dae(raw):
        del raw["methods"]["dae_all_3d"]
        raw["runs_3d"] = {name: run for name, run in raw["runs_3d"].items() if run["init"] != "dae_all_3d"}
        for run in raw["runs_3d"].values():
            run["baseline"] = None
    rows = _changed(default_raw, without_3d_dae)
    for topic in ("training length (3D)", "global batch (3D)", "3D crops"):
        assert ("003", topic) not in _topics(rows)
        assert ("003", topic) in _topics(default) and ("003", topic) in _topics(full)



def test_2d_length_matches_when_the_dae_epochs_go_over_scans(default, full, full_raw):
    quick = _row(default, "003", "training length (2D)")
    assert not quick.matches and "of every axial slice of every training scan" in quick.ours
    assert "so many more steps per epoch" in quick.ours
    seeds = _row(full, "003", "training length (2D)")  # the profile's `epoch_unit: scans`, 300 / 1000 epochs
    assert seeds.matches and "300 epochs of one axial slice per training scan, drawn anew each epoch" in seeds.ours
    assert "1000 epochs of one axial slice per training scan" in seeds.ours and "steps" not in seeds.ours

    def one_over_slices(raw):
        del raw["methods"]["dae_local"]["epoch_unit"]
    row = _row(_changed(full_raw, one_over_slices), "003", "training length (2D)")
    assert not row.matches and "300 epochs of every axial slice of every training scan (`dae_local`)" in row.ours

    def shorter(raw):
        raw["methods"]["dae_all"]["train"]["epochs"] = 300  # over scans, but not the seed's 1000 for `all`
    assert not _row(_changed(full_raw, shorter), "003", "training length (2D)").matches


def test_3d_global_batch_is_16_under_the_full_profile(full, full_raw):
    row = _row(full, "003", "global batch (3D)")
    assert row.matches and "2 x 8 accumulated x 1 process(es) x 1 node(s) = 16 crops" in row.ours

    def two_gpus(raw):
        raw["launch"]["nproc_per_node"] = 2  # without halving accumulate: 32 crops per step
    row = _row(_changed(full_raw, two_gpus), "003", "global batch (3D)")
    assert not row.matches and "= 32 crops" in row.ours

    def no_accumulation(raw):  # accumulate left out: the default, 1
        del raw["methods"]["dae_all_3d"]["train"]["accumulate"]
    row = _row(_changed(full_raw, no_accumulation), "003", "global batch (3D)")
    assert not row.matches and "2 x 1 accumulated" in row.ours and "= 2 crops" in row.ours


def test_3d_crops_match_when_drawn_every_epoch_at_96(full, full_raw):
    crops = _row(full, "003", "3D crops")
    assert crops.matches and "8 crop(s) of 96^3 per scan drawn anew every epoch" in crops.ours

    def drawn_once(raw):
        raw["crops"]["draw"] = "once"
    crops = _row(_changed(full_raw, drawn_once), "003", "3D crops")
    assert not crops.matches and "8 crop(s) of 96^3 per scan drawn once" in crops.ours

    def smaller(raw):
        raw["crops"]["side"] = 64
    crops = _row(_changed(full_raw, smaller), "003", "3D crops")
    assert not crops.matches and "of 64^3 per scan drawn anew every epoch" in crops.ours


def test_3d_length_differs_by_the_crops_per_scan(full, full_raw):
    length = _row(full, "003", "training length (3D)")
    assert not length.matches and "8x the seed's steps per epoch" in length.ours

    def one_crop(raw):
        raw["crops"]["per_scan"] = 1
    assert _row(_changed(full_raw, one_crop), "003", "training length (3D)").matches  # 1000 epochs of `all`


def test_the_field_of_view_row_names_each_view_and_matches_only_the_whole_slice(default, full, default_raw):
    window = _row(default, "000", "field of view")
    assert not window.matches and "A window 160 mm across in the lungs" in window.ours \
        and "2.5 mm pixels in every scan" in window.ours and "scored within it" in window.ours
    assert _row(full, "000", "field of view").matches

    def lungs(raw):
        raw["slices"]["field_of_view"] = "lungs"
    box = _row(_changed(default_raw, lungs), "000", "field of view")
    assert not box.matches and "The box of each scan's lungs" in box.ours


def test_hu_window_and_precision_follow_params(default, full_raw):
    assert not _row(default, "003", "CT intensity window").matches
    assert _row(default, "003", "DAE precision").matches

    def seeds_window_with_amp(raw):
        raw["preprocess"]["hu_window"] = [-1000.0, 1000.0]
        raw["recipes"]["dae"]["amp"] = True
        raw["recipes"]["dae"]["amp_dtype"] = "bf16"
    changed = _changed(full_raw, seeds_window_with_amp)
    assert _row(changed, "003", "CT intensity window").matches
    precision = _row(changed, "003", "DAE precision")
    assert not precision.matches and "AMP bf16" in precision.ours
    everything = _row(changed, "all", "mixed precision")
    assert not everything.matches and "fp32 in" not in everything.ours


def test_autoencoders_with_perceptual_weights_are_not_listed_as_lacking_the_term(default, full_raw):
    row = _row(default, "000", "perceptual loss")
    lacking = row.ours.split(" without the perceptual term")[0]
    assert not row.matches and "`ae_swin`" in lacking and "`multihead_seg`" in lacking

    def with_term(raw, names):
        for section in ("methods", "multihead"):
            for name in names:
                if name in raw[section]:
                    raw[section][name]["loss"].update(
                        perceptual=1.0, perceptual_weights="vgg16.pt", perceptual_sha256="0" * 64)

    row = _row(_changed(full_raw, lambda raw: with_term(raw, ["ae_swin"])), "000", "perceptual loss")
    lacking, having = row.ours.split(" without the perceptual term")
    assert "`ae_swin`" not in lacking and "`ae_cnn_attention`" in lacking and "`ae_swin`" in having
    assert not row.matches

    every = [*full_raw["multihead"], "ae_swin", "ae_cnn_attention"]
    row = _row(_changed(full_raw, lambda raw: with_term(raw, every)), "000", "perceptual loss")
    assert row.matches and "without" not in row.ours


def test_data_size_and_classifier_points(default, full):
    assert not _row(default, "000", "CT data").matches and "phantom" in _row(default, "000", "CT data").ours
    assert _row(full, "000", "CT data").matches
    assert not _row(default, "000", "slice size").matches and _row(full, "000", "slice size").matches
    assert not _row(full, "000", "split").matches  # patient-level by design
    assert "0.8 / 0.1 / 0.1" in _row(full, "000", "split").ours
    assert "deepest Swin map (192 channels, 2 x 2 for a 64 px slice)" in _row(default, "000", "classifier input").ours
    assert "deepest Swin map (768 channels, 4 x 4 for a 128 px slice)" in _row(full, "000", "classifier input").ours
    assert "weights [1, 1]" in _row(default, "000", "classification balance").ours
    assert "`class_weights: balanced`" in _row(full, "000", "classification balance").ours


def test_label_fractions_match_only_in_the_seeds_unit_and_shares(default, full, full_raw):
    # The default profile draws shares of patients; the full profile the seed's eight shares of images.
    patients = _row(default, "001", "label fractions")
    assert not patients.matches and "training patients" in patients.ours
    images = _row(full, "001", "label fractions")
    assert images.matches and "training images" in images.ours and "1, 5, 10, 15, 20, 25, 50, 100%" in images.ours

    def of_patients(raw):
        raw["label_fraction"]["unit"] = "patients"

    row = _row(_changed(full_raw, of_patients), "001", "label fractions")
    assert not row.matches and "training patients" in row.ours

    def fewer_shares(raw):
        raw["label_fraction"]["fractions"] = [0.1, 0.5, 1.0]

    row = _row(_changed(full_raw, fewer_shares), "001", "label fractions")
    assert not row.matches and "Shares 10, 50, 100% of each run's training images" in row.ours


def test_classification_balance_matches_with_nodule_free_clean_slices_and_balanced_weights(default, full, full_raw):
    assert not _row(default, "000", "classification balance").matches
    row = _row(full, "000", "classification balance")
    assert row.matches and "patients without any annotation" in row.ours and "[50, 1]" in row.seed_protocol

    def any_slice(raw):
        raw["slices"]["clean_source"] = "any_slice"

    def seeds_numbers(raw):  # [50, 1] fit the seed's class counts, not those of our sampling
        raw["runs"]["cls_resnet50_swin"]["class_weights"] = [50.0, 1.0]

    row = _row(_changed(full_raw, any_slice), "000", "classification balance")
    assert not row.matches and "any slice without nodule pixels" in row.ours
    row = _row(_changed(full_raw, seeds_numbers), "000", "classification balance")
    assert not row.matches and "weights [50, 1] (`cls_resnet50_swin`)" in row.ours


def test_multitask_cls_heads_match_only_with_weights_balanced_to_their_slices(default, full, full_raw):
    for profile in (default, full):
        row = _row(profile, "000", "multi-task classification balance")
        assert row.matches and "`cls_class_weights: balanced`" in row.ours and "every pretraining slice" in row.ours

    def one_fixed(raw):
        raw["multihead"]["multihead_cls"]["cls_class_weights"] = [50.0, 1.0]

    row = _row(_changed(full_raw, one_fixed), "000", "multi-task classification balance")
    assert not row.matches and "weights [50, 1] (`multihead_cls`)" in row.ours

    def no_cls_head(raw):
        for entry in raw["multihead"].values():
            entry["heads"] = ["seg"]
        raw["report"]["seed000_multihead_classification"] = []

    assert ("000", "multi-task classification balance") not in _topics(_changed(full_raw, no_cls_head))


def test_radiograph_pretraining_length_and_image_size(default, full, full_raw):
    assert not _row(default, "001", "radiograph pretraining length").matches
    assert not _row(default, "004", "radiograph pretraining length").matches
    assert not _row(default, "004", "ViT input").matches
    assert "8 epochs at batch 8" in _row(default, "004", "radiograph pretraining length").ours
    assert "64 x 64 px, patch 8 (64 tokens) on radiographs" in _row(default, "004", "ViT input").ours
    # The full profile gives each seed its own radiograph recipe (pretrain_radiographs.per_entry).
    assert _row(full, "001", "radiograph pretraining length").matches
    assert "60 epochs at batch 128" in _row(full, "001", "radiograph pretraining length").ours
    assert _row(full, "004", "radiograph pretraining length").matches
    assert "200 epochs at batch 512" in _row(full, "004", "radiograph pretraining length").ours
    vit = _row(full, "004", "ViT input")
    assert vit.matches and "256 x 256 px, patch 32 (64 tokens) on radiographs" in vit.ours

    def shorter_mae(raw):
        raw["pretrain_radiographs"]["per_entry"]["mae"]["train"]["epochs"] = 100
    changed = _changed(full_raw, shorter_mae)
    length = _row(changed, "004", "radiograph pretraining length")
    assert not length.matches and "100 epochs at batch 512 (`mae`)" in length.ours
    assert _row(changed, "001", "radiograph pretraining length").matches

    def patch_16(raw):
        for name in ("mae", "diffmae", "scratch_vit"):
            raw["pretrain_radiographs"]["per_entry"][name]["backbone"]["patch_size"] = 16
    changed = _changed(full_raw, patch_16)
    vit = _row(changed, "004", "ViT input")
    assert not vit.matches and "256 x 256 px, patch 16 (256 tokens)" in vit.ours

    def no_vit_on_radiographs(raw):
        block = raw["pretrain_radiographs"]
        block.update(methods=["barlow_twins"], study_methods=[], per_entry={})
        drop_radiograph_runs_of_absent_encoders(raw)
    vit = _row(_changed(full_raw, no_vit_on_radiographs), "004", "ViT input")
    assert not vit.matches and "128 x 128 px, patch 16 (64 tokens) on CT slices only" in vit.ours


def test_real_radiographs_match_the_seed_that_used_them(full, full_raw):
    for seed in ("001", "002", "004"):
        assert not _row(full, seed, "radiographs").matches
        assert "rendered" in _row(full, seed, "radiographs").ours

    def chestxray14(raw):
        raw["data"]["cxr"].update(source="chestxray14", root="/data/cxr14", labels=[])
    changed = _changed(full_raw, chestxray14)
    assert _row(changed, "002", "radiographs").matches
    assert not _row(changed, "001", "radiographs").matches and not _row(changed, "004", "radiographs").matches


def test_points_without_their_entries_are_left_out(default_raw):
    def without_dae(raw):
        dae = [name for name, entry in raw["methods"].items() if entry["method"] == "dae"]
        for name in dae:
            del raw["methods"][name]
        raw["runs"] = {name: run for name, run in raw["runs"].items() if run["init"] not in dae}
        raw["runs_3d"] = {}
        raw["cross_modal"]["methods"] = []
    rows = _changed(default_raw, without_dae)
    assert not [row for row in rows if row.seed == "003"]
    assert ("000", "perceptual loss") in _topics(rows)


def test_profile_applied_to_files_gives_the_same_rows(full, tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "params", tmp_path / "params")
    apply_profile(tmp_path / "params" / "lidc-full.yaml", tmp_path / "params.yaml")
    assert protocol_differences(load_params(tmp_path / "params.yaml")) == full


def test_the_report_renders_the_table_and_writes_it(full_raw, full, tmp_path):
    params = validate(copy.deepcopy(full_raw))
    out_dir = tmp_path / "reports"
    written = build_report(out_dir, {}, {}, {}, {}, {}, params=params)
    readme = (out_dir / "README.md").read_text()
    protocol = readme.split("## Protocol")[1].split("\n## ")[0]
    assert "### Differences from the seeds' protocols" in protocol
    assert "| Seed | What | The seed's protocol | Ours | Same? |" in protocol
    batch = _row(full, "003", "global batch (3D)")
    assert f"| 003 | global batch (3D) | {batch.seed_protocol} | {batch.ours} | yes |" in protocol
    assert "Numbers: [tables/protocol_differences.csv](tables/protocol_differences.csv)" in protocol

    csv = out_dir / "tables" / "protocol_differences.csv"
    assert csv in written and out_dir / "tables" / "protocol_differences.md" in written
    frame = pd.read_csv(csv, dtype={"seed": str})
    assert list(frame.columns) == ["seed", "topic", "seed_protocol", "ours", "matches"]
    assert [Difference(**row) for row in frame.to_dict("records")] == full

    build_report(tmp_path / "bare", {}, {}, {}, {}, {})  # without params: no table
    assert "Differences from the seeds'" not in (tmp_path / "bare" / "README.md").read_text()
    assert not (tmp_path / "bare" / "tables" / "protocol_differences.csv").exists()


def test_training_seeds_are_one_by_default_and_three_under_the_full_profile(default, full):
    assert _row(default, "all", "training seeds").matches
    assert "One training seed (`seed: 42`)" in _row(default, "all", "training seeds").ours
    row = _row(full, "all", "training seeds")
    assert not row.matches and "3 seeds (42, 43, 44; `training_seeds`)" in row.ours
