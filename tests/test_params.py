"""params.yaml validation: every problem named with key, value and what is allowed."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from chestssl.params import PARAMS_FILES, ParamsError, TrainRecipe, load_params, validate
from chestssl.profiles import params_with_profile
from tests.shipped_params import read_shipped_params
from tests.tiny_configs import drop_radiograph_runs_of_absent_encoders

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return read_shipped_params()


def problems(params: dict) -> list[str]:
    from chestssl.methods import method_configs

    with pytest.raises(ParamsError) as info:
        validate(params, method_configs=method_configs())
    return info.value.problems


def test_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params["data"]["source"] == "phantom"
    # The quick profile: per seed table a pretrained entry and its baseline.
    assert set(params["methods"]) == {"scratch_swin", "ae_swin", "scratch_resnet18", "barlow_twins", "scratch_vit",
                                      "mae", "diffmae", "dae_all", "scratch_swin_3d", "dae_all_3d"}
    assert set(params["multihead"]) == {"multihead_clsseg"}
    assert params["multihead"]["multihead_clsseg"]["seg_beta"] is None
    assert set(params["latent_diffusion"]) == {"ae_swin"}


def test_all_entries_adds_every_seed_tables_entry_and_its_report_rows():
    from chestssl.methods import method_configs

    params = validate(read_shipped_params(), method_configs=method_configs())
    assert set(params["methods"]) >= {"scratch_cnn_attention", "ae_cnn_attention", "dae_denoise", "dae_superres",
                                      "dae_local"}
    assert set(params["multihead"]) == {"multihead_seg", "multihead_cls", "multihead_clsseg", "multihead_seg_beta25",
                                        "multihead_clsseg_beta25"}
    assert params["multihead"]["multihead_seg_beta25"]["seg_beta"] == 25.0
    assert len(params["runs"]) == 23 and set(params["latent_diffusion"]) == {"ae_swin", "ae_cnn_attention"}
    # Every row of every seed 000 table names an entry once all are added; the quick profile leaves some null.
    rows = [row for table in params["report"].values() for row in table]
    assert all(any(row.get(key) for key in ("method", "run", "multihead", "latent_diffusion")) for row in rows)
    quick = load_params(ROOT / "params.yaml")["report"]
    assert any(row.get(key, "") is None for table in quick.values() for row in table
               for key in ("method", "run", "multihead", "latent_diffusion"))


def test_full_profile_is_valid_after_merge():
    from chestssl.methods import method_configs
    from chestssl.params import radiograph_entry

    merged = params_with_profile(ROOT / "params" / "lidc-full.yaml", ROOT / "params.yaml")
    params = validate(merged, method_configs=method_configs())
    assert params["data"]["source"] == "tcia"
    assert params["slices"]["side"] == 128
    # Each seed's own radiograph recipe (seed 001: 60 epochs at 128; seed 004: 200 at 512, 5% warm-up,
    # 256 px in patches of 32), the CT's ViT left at 128 px.
    barlow = radiograph_entry(params, "barlow_twins")["train"]
    assert (barlow["epochs"], barlow["batch_size"]) == (60, 128)
    for name, listed_in in (("mae", "methods"), ("diffmae", "methods"), ("mae", "study_methods")):
        entry = radiograph_entry(params, name, listed_in)
        assert (entry["train"]["epochs"], entry["train"]["batch_size"], entry["train"]["warmup_epochs"]) == (200, 512, 10)
        assert (entry["backbone"]["img_size"], entry["backbone"]["patch_size"]) == (256, 32)
        assert params["methods"][name]["backbone"]["img_size"] == params["slices"]["side"] == 128
    assert radiograph_entry(params, "scratch_vit")["backbone"]["patch_size"] == 32


def test_unknown_key_is_named_with_the_allowed_keys(raw):
    raw["preprocess"]["spacingg"] = [1, 1, 1]
    (problem,) = problems(raw)
    assert problem.startswith("preprocess.spacingg: unknown key")
    assert "spacing" in problem


def test_wrong_type_and_out_of_range_name_key_value_and_rule(raw):
    raw["recipes"]["autoencoder"]["batch_size"] = "big"
    raw["methods"]["ae_swin"]["train"] = {"epochs": 0}  # an entry's own train keys are checked too
    raw["preprocess"]["clevel"] = 1.5
    raw["runs"]["seg_unetpp_cnn_attention"]["loss"] = "l2"
    found = problems(raw)
    assert "recipes.autoencoder.batch_size: got 'big', expected an integer >= 1" in found
    assert "methods.ae_swin.train.epochs: got 0, expected an integer >= 1" in found
    assert "preprocess.clevel: got 1.5, expected a number > 0 and <= 1" in found
    assert any(p.startswith("runs.seg_unetpp_cnn_attention.loss: got 'l2', expected one of 'ce', 'dice', 'focal'") for p in found)


def test_bool_is_not_an_int_and_floats_accept_scientific_strings(raw):
    raw["seed"] = True
    raw["methods"]["ae_swin"]["train"] = {"lr": "1e-3"}
    (problem,) = problems(copy.deepcopy(raw))
    assert problem.startswith("seed: got True")
    raw["seed"] = 1
    assert validate(raw)["methods"]["ae_swin"]["train"]["lr"] == pytest.approx(1e-3)


def test_missing_key_and_unknown_method(raw):
    del raw["methods"]["ae_swin"]["loss"]["ssim"]
    raw["methods"]["new"] = {"method": "byol"}
    found = problems(raw)
    assert any(p.startswith("methods.ae_swin.loss.ssim: missing") for p in found)
    assert any(p.startswith("methods.new.method: got 'byol', expected one of") for p in found)


def test_run_init_must_name_a_method_and_split_must_sum_to_one(raw):
    raw["runs"]["seg_unetpp_cnn_attention"]["init"] = "nope"
    raw["preprocess"]["split"]["test"] += 0.25
    total = sum(raw["preprocess"]["split"][k] for k in ("train", "val", "test"))
    found = problems(raw)
    assert f"preprocess.split: train + val + test = {total:g}, expected 1" in found
    assert any(p.startswith("runs.seg_unetpp_cnn_attention.init: got 'nope'") for p in found)


def test_local_source_needs_a_path(raw):
    raw["data"]["source"] = "local"
    (problem,) = problems(raw)
    assert problem.startswith("data.local.path: empty")


def test_a_chest_xray_dataset_needs_its_folder(raw):
    raw["data"]["cxr"]["source"] = "mimic_cxr"
    (problem,) = problems(raw)
    assert problem.startswith("data.cxr.root: empty, but data.cxr.source is 'mimic_cxr'")
    raw["data"]["cxr"]["root"] = "/data/mimic-cxr-jpg"
    raw["pretrain_radiographs"]["views"] = ["frontal"]  # MIMIC-CXR studies can hold several frontal images
    validate(raw)


def test_backbone_schema_follows_its_name(raw):
    raw["backbones"]["swin"]["features"] = [1, 2, 3, 4, 5]
    raw["backbones"]["cnn_attention"]["name"] = "densenet121"
    found = problems(raw)
    assert any(p.startswith("backbones.swin.features: unknown key") for p in found)
    assert any(p.startswith("backbones.cnn_attention.name: got 'densenet121', expected one of") for p in found)


def test_multihead_seg_beta_inherits_the_top_level_value_unless_set(raw):
    from chestssl.params import pretrain_entry

    raw["seg_beta"] = 7.0
    params = validate(raw)
    assert pretrain_entry(params, "multihead_seg") == ("multihead", {**params["multihead"]["multihead_seg"], "seg_beta": 7.0})
    assert pretrain_entry(params, "multihead_seg_beta25")[1]["seg_beta"] == 25.0
    assert pretrain_entry(params, "ae_swin")[0] == "methods"
    raw["multihead"]["ae_swin"] = copy.deepcopy(raw["multihead"]["multihead_cls"])
    assert any(p.startswith("multihead.ae_swin: the name is also used under `methods`") for p in problems(raw))
    raw["multihead"]["multihead_seg"]["seg_beta"] = "big"
    found = problems(raw)
    assert any(p.startswith("multihead.multihead_seg.seg_beta: got 'big'") and p.endswith("or null") for p in found)


def test_sizes_that_must_agree_with_the_data_are_checked(raw):
    raw["backbones"]["vit"]["img_size"] = 32  # slices.side is 64
    raw["backbones"]["vit_p7"] = {**raw["backbones"]["vit"], "img_size": 64, "patch_size": 7}
    raw["methods"]["diffmae"]["backbone"] = "vit_p7"
    raw["methods"]["diffmae"]["beta_start"] = 0.5
    raw["backbones"]["swin_3d"] = {**raw["backbones"]["swin"], "spatial_dims": 3}
    raw["methods"]["dae_all"]["backbone"] = "swin_3d"  # runs start from it on 2D slices
    found = problems(raw)
    # once per preset, naming the entries that use it
    assert [p for p in found if p.startswith("backbones.vit.img_size")] == [
        "backbones.vit.img_size: got 32, but slices.side is 64; the ViT's position embeddings are built for one "
        "input size, so set them equal (the backbone of methods.scratch_vit, methods.mae)"]
    assert any(p.startswith("backbones.vit_p7.patch_size: got 7") for p in found)
    assert any(p.startswith("methods.diffmae: beta_start 0.5 must be below beta_end 0.2") for p in found)
    assert any(p.startswith("runs.seg_swinunetr_dae_all.init: 'dae_all' has a 3D backbone") for p in found)


def test_a_3d_vit_is_sized_by_the_crops(raw):
    raw["backbones"]["vit_3d"] = {**raw["backbones"]["vit"], "spatial_dims": 3, "img_size": raw["crops"]["side"],
                                  "hidden_size": 48}  # 3D sin-cos position embeddings need a multiple of 6
    raw["methods"]["mae"]["backbone"] = "vit_3d"
    raw["runs"] = {name: run for name, run in raw["runs"].items() if run["init"] != "mae"}
    raw["label_fraction"]["runs"] = [name for name in raw["label_fraction"]["runs"] if name in raw["runs"]]
    raw["pretrain_radiographs"]["methods"].remove("mae")  # radiographs are 2D
    raw["pretrain_radiographs"]["study_methods"].remove("mae")
    validate(raw)


def test_ablations_name_existing_runs_once_and_frozen_parts_only_classification(raw):
    raw["label_fraction"]["runs"] = ["cls_linear_barlow_twins", "cls_linear_barlow_twins", "no_such_run"]
    raw["frozen_parts"]["runs"] = ["seg_swinunetr_scratch"]
    raw["frozen_parts"]["unfrozen_stages"] = []
    found = "\n".join(problems(raw))
    assert "label_fraction.runs: 'cls_linear_barlow_twins' is listed twice" in found
    assert "label_fraction.runs: 'no_such_run' is not an entry under `runs`" in found
    assert "frozen_parts.runs: 'seg_swinunetr_scratch' is a 'seg' run" in found
    assert "frozen_parts.unfrozen_stages: empty" in found


def test_label_fractions_are_shares(raw):
    raw["label_fraction"]["fractions"] = [0.1, 1.5, 0.0]
    found = "\n".join(problems(raw))
    assert "label_fraction.fractions[1]" in found and "label_fraction.fractions[2]" in found


def test_label_fraction_unit_is_patients_or_images(raw):
    assert validate(copy.deepcopy(raw))["label_fraction"]["unit"] == "patients"  # the default profile's
    raw["label_fraction"]["unit"] = "slices"
    found = "\n".join(problems(raw))
    assert "label_fraction.unit" in found and "'patients', 'images'" in found
    del raw["label_fraction"]["unit"]
    assert "label_fraction.unit" in "\n".join(problems(raw))


def test_radiograph_pretraining_names_2d_methods_once_sized_for_the_radiographs(raw):
    raw["pretrain_radiographs"]["methods"] = ["mae", "mae", "dae_all", "no_such_method"]
    raw["backbones"]["swin_3d"] = {**raw["backbones"]["swin"], "spatial_dims": 3}
    raw["methods"]["dae_all"]["backbone"] = "swin_3d"
    raw["radiographs"]["side"] = 96
    raw["radiographs"]["window_percentiles"] = [99.0, 1.0]
    raw["pretrain_radiographs"]["views"] = ["frontal", "frontal"]
    found = "\n".join(problems(raw))
    assert "pretrain_radiographs.methods: 'mae' is listed twice" in found
    assert "pretrain_radiographs.methods: 'no_such_method' is not an entry under `methods`" in found
    assert "pretrain_radiographs.methods: 'dae_all' has a 3D backbone" in found
    assert "ViT" not in found and "per_entry" not in found  # a ViT takes radiographs.side (96), not slices.side
    assert "radiographs.window_percentiles: got [99.0, 1.0], expected [low, high] with low < high" in found
    assert "pretrain_radiographs.views: 'frontal' is listed twice" in found


def test_a_radiograph_run_starts_from_a_radiograph_encoder_or_from_scratch(raw):
    bad_mode = yaml.safe_load(yaml.safe_dump(raw))
    bad_mode["radiograph_runs"]["cxr_densenet121_aligned"]["mode"] = "ordinal"
    (problem,) = problems(bad_mode)
    assert problem.startswith("radiograph_runs.cxr_densenet121_aligned.mode: got 'ordinal'")
    raw["radiograph_runs"]["cxr_linear_barlow_twins"]["init"] = "ae_swin"
    raw["radiograph_runs"]["cxr_densenet121"]["init"] = "barlow_twins"
    found = problems(raw)
    assert any(p.startswith("radiograph_runs.cxr_linear_barlow_twins.init: got 'ae_swin', expected one of "
                            "pretrain_radiographs.methods") for p in found)
    assert ("radiograph_runs.cxr_densenet121.init: got 'barlow_twins', but arch densenet121 starts from a seeded "
            "random initialisation; set init to null") in found


def test_radiograph_views_and_size_are_checked(raw):
    bad_view = yaml.safe_load(yaml.safe_dump(raw))
    bad_view["pretrain_radiographs"]["views"] = ["oblique"]
    found = "\n".join(problems(bad_view))
    assert "pretrain_radiographs.views" in found and "'oblique'" in found
    raw["radiographs"]["side"] = 72
    raw["pretrain_radiographs"]["methods"] = ["barlow_twins"]  # a ResNet takes any size
    raw["pretrain_radiographs"]["study_methods"] = []
    drop_radiograph_runs_of_absent_encoders(raw)
    assert problems(raw) == ["radiographs.side: got 72, expected a multiple of 16"]


def test_the_ablations_on_radiographs_name_existing_radiograph_runs_once(raw):
    raw["label_fraction"]["radiograph_runs"] = ["cxr_linear_barlow_twins", "cxr_linear_barlow_twins", "cxr_vgg"]
    raw["frozen_parts"]["radiograph_runs"] = ["cxr_densenet121"]
    found = "\n".join(problems(raw))
    assert "label_fraction.radiograph_runs: 'cxr_linear_barlow_twins' is listed twice" in found
    assert "label_fraction.radiograph_runs: 'cxr_vgg' is not an entry under `radiograph_runs`" in found
    assert "frozen_parts.radiograph_runs: 'cxr_densenet121' is a 'densenet121' run without a pretrained encoder" in found
    raw["frozen_parts"].update(radiograph_runs=["cxr_linear_barlow_twins"], unfrozen_stages=[], runs=[])
    assert "frozen_parts.unfrozen_stages: empty" in "\n".join(problems(raw))


def test_study_level_pretraining_takes_masked_vit_entries_and_two_views(raw):
    raw["pretrain_radiographs"]["study_methods"] = ["barlow_twins", "diffmae", "diffmae"]
    raw["pretrain_radiographs"]["views"] = ["lateral"]
    found = "\n".join(problems(raw))
    assert "pretrain_radiographs.study_methods: 'barlow_twins' is a 'barlow_twins' entry" in found
    assert "pretrain_radiographs.study_methods: 'diffmae' is listed twice" in found
    assert "studies of the single view 'lateral' share nothing" in found
    raw["pretrain_radiographs"]["views"] = []
    assert problems(raw).count("pretrain_radiographs.views: empty; list frontal, lateral or both") == 1
    raw["pretrain_radiographs"]["views"] = ["frontal", "lateral"]
    raw["pretrain_radiographs"]["study_methods"] = ["mae"]
    validate(raw)


def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    """DVC refuses duplicate keys; a stage run directly used to keep the last value silently."""
    text = (Path(__file__).parents[1] / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("\nseed: ", "\nseed: 7\nseed: ", 1))
    with pytest.raises(ParamsError, match=r"params\.yaml: line \d+, column 1: key 'seed' appears twice .*lines \d+ "
                                          r"and \d+") as error:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, where", [("seed: 1\nruns: [a, b\nx: 2\n", "line 3"), ("seed: 1\n\tbad: 2\n", "line 2"),
                                         ("- a\n- b\n", "holds a list")])
def test_a_yaml_syntax_error_is_one_line_naming_file_and_line(tmp_path, text, where):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError) as error:
        load_params(tmp_path / "params.yaml")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "params.yaml") in message and where in message


def _copy_params(folder: Path) -> Path:
    """The shipped params files in ``folder``; returns the copy of params.yaml."""
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    shutil.copytree(ROOT / "params", folder / "params")
    return folder / "params.yaml"


def test_a_profile_with_a_duplicate_key_is_refused(tmp_path):
    from chestssl.profiles import apply_profile

    params = _copy_params(tmp_path)
    (tmp_path / "profile.yaml").write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ParamsError, match=r"profile\.yaml: line 2, column 1: key 'seed' appears twice"):
        apply_profile(tmp_path / "profile.yaml", params)


@pytest.mark.parametrize("base_url", ["", "services.cancerimagingarchive.net/nbia-api/services/v1",
                                      "ftp://services.cancerimagingarchive.net/nbia-api/services/v1",
                                      "http:///nbia-api/services/v1", "https://host with space/v1"])
def test_a_malformed_tcia_base_url_names_key_value_and_what_is_allowed(raw, base_url):
    raw["data"]["tcia"]["base_url"] = base_url
    (problem,) = problems(raw)  # checked whatever data.source is: a profile switches it on
    assert problem.startswith(f"data.tcia.base_url: got {base_url!r}, expected")
    assert "http(s) URL with a host" in problem


@pytest.mark.parametrize("base_url", ["https://services.cancerimagingarchive.net/nbia-api/services/v1",
                                      "HTTP://127.0.0.1:8080/nbia-api/services/v1/", "http://[::1]:80/v1"])
def test_a_well_formed_tcia_base_url_is_accepted(raw, base_url):
    raw["data"]["tcia"]["base_url"] = base_url
    assert validate(raw)["data"]["tcia"]["base_url"] == base_url


@pytest.mark.parametrize("endpoint", ["", "s3://idc-open-data", "s3.amazonaws.com"])
def test_a_malformed_idc_endpoint_names_key_value_and_what_is_allowed(raw, endpoint):
    raw["data"]["idc"]["endpoint_url"] = endpoint
    (problem,) = problems(raw)
    assert problem.startswith(f"data.idc.endpoint_url: got {endpoint!r}, expected")


def test_the_idc_source_is_accepted_with_its_block(raw):
    raw["data"]["source"] = "idc"
    raw["data"]["idc"].update(patients=["LIDC-IDRI-0001"], workers=4)
    idc = validate(raw)["data"]["idc"]
    assert idc["patients"] == ["LIDC-IDRI-0001"] and idc["endpoint_url"] == "https://s3.amazonaws.com"
    raw["data"]["idc"]["workers"] = 0
    (problem,) = problems(raw)
    assert problem.startswith("data.idc.workers: got 0")


@pytest.mark.parametrize("value", [-1.0, "fast"])
def test_tcia_min_rate_is_a_non_negative_number(raw, value):
    raw["data"]["tcia"]["min_rate_kbps"] = value
    (problem,) = problems(raw)
    assert problem.startswith(f"data.tcia.min_rate_kbps: got {value!r}, expected a number >= 0")


def test_entries_take_their_presets_and_may_replace_recipe_keys(raw):
    raw["methods"]["mae"]["train"] = {"epochs": 9}
    params = validate(raw)
    mae, diffmae = params["methods"]["mae"], params["methods"]["diffmae"]
    assert mae["backbone"] == raw["backbones"]["vit"] and "recipe" not in mae
    assert mae["train"] == {**raw["recipes"]["mae"], "epochs": 9}
    # the preset itself is not changed by mae's keys; diffmae replaces its own
    assert diffmae["train"] == {**raw["recipes"]["mae"], "val_every_epochs": 3}
    assert "train" not in params["methods"]["scratch_vit"]
    assert params["runs"]["cls_linear_mae"]["train"] == raw["recipes"]["linear_head"]


def test_preset_references_are_checked(raw):
    raw["methods"]["mae"]["backbone"] = "vit_huge"
    raw["methods"]["diffmae"]["recipe"] = "none"
    raw["methods"]["scratch_vit"]["recipe"] = "mae"
    raw["runs"]["cls_linear_mae"]["recipe"] = "fast"
    found = problems(raw)
    assert any(p.startswith("methods.mae.backbone: got 'vit_huge', expected a name under `backbones`: cnn_attention, swin")
               for p in found)
    assert any(p.startswith("methods.diffmae.recipe: 'none' means not trained") for p in found)
    assert "methods.scratch_vit.recipe: got 'mae', but a scratch entry is not trained; set it to 'none'" in found
    assert any(p.startswith("runs.cls_linear_mae.recipe: got 'fast', expected a name under `recipes`") for p in found)


def test_an_unused_preset_is_still_checked(raw):
    raw["recipes"]["spare"] = {**raw["recipes"]["mae"], "optimizer": "lamb"}
    (problem,) = problems(raw)
    assert problem.startswith("recipes.spare.optimizer: got 'lamb'")


def test_the_shipped_params_repeat_no_recipe_or_backbone_and_stay_short():
    files = [ROOT / "params.yaml", *(ROOT / name for name in PARAMS_FILES)]
    # 600 lines for the DAG of 102 stages; seed 000's latent diffusion and FID (5 stages) add 20,
    # the radiograph fine-tuning of seeds 001 and 002 (4 stages) 10, the idc data source 8,
    # seed 003's 3D path (a scratch and a DAE 3D entry, two 3D segmentation runs: 8 stages) 20.
    assert sum(len(file.read_text().splitlines()) for file in files) < 663
    raw = read_shipped_params()
    for section in ("methods", "multihead", "runs", "radiograph_runs", "runs_3d", "latent_diffusion"):
        for name, entry in raw[section].items():
            assert isinstance(entry.get("recipe"), str), f"{section}.{name} names no recipe"
            assert not set(entry.get("train", {})) >= {n for n, f in TrainRecipe.model_fields.items() if f.is_required()}, \
                f"{section}.{name} repeats a whole recipe"
            if section in ("methods", "multihead"):
                assert isinstance(entry["backbone"], str), f"{section}.{name} spells out its backbone"


def test_each_group_is_read_from_its_own_file_and_named_there(tmp_path):
    params = _copy_params(tmp_path)
    runs = tmp_path / "params" / "runs.yaml"
    runs.write_text(runs.read_text().replace("loss: ce", "loss: l2", 1))
    with pytest.raises(ParamsError) as error:
        load_params(params)
    assert str(error.value).startswith(f"invalid parameters in {runs}: runs.seg_swinunetr_scratch.loss: got 'l2'")
    presets = tmp_path / "params" / "presets.yaml"
    text = presets.read_text()
    at = text.index("epochs:", text.index("\n  segmentation:"))
    presets.write_text(text[:at] + "epochs: 0 " + text[text.index(" ", at + len("epochs: ")):])
    with pytest.raises(ParamsError) as error:
        load_params(params)
    assert f"  - {presets}: recipes.segmentation.epochs: got 0" in str(error.value)
    assert f"  - {runs}: runs.seg_swinunetr_scratch.loss: got 'l2'" in str(error.value)


def test_a_missing_or_misplaced_group_file_is_named(tmp_path):
    params = _copy_params(tmp_path)
    (tmp_path / "params" / "runs.yaml").rename(tmp_path / "runs.yaml")
    with pytest.raises(FileNotFoundError, match=r"params/runs\.yaml not found; it holds runs"):
        load_params(params)
    (tmp_path / "params" / "runs.yaml").write_text("seed: 3\n" + (tmp_path / "runs.yaml").read_text())
    with pytest.raises(ParamsError, match=r"seed: this group belongs in params\.yaml"):
        load_params(params)


def test_dvc_yaml_reads_each_group_from_the_file_that_holds_it():
    """DVC looks a key up in the file a stage names (params.yaml when none): a key named
    in the wrong file would be reported missing by DVC, not by our validator."""
    from chestssl.params import params_file_of

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert dvc["vars"] == list(PARAMS_FILES)
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        for item in body.get("params", []):
            for file, keys in (item.items() if isinstance(item, dict) else [("params.yaml", [item])]):
                for key in keys:
                    assert params_file_of(key.split(".")[0]) == file, f"{name}: {key} is read from {file}"


def test_a_report_row_naming_a_missing_entry_is_an_error_naming_its_key(raw):
    raw["report"]["seed000_pretrained_segmentation"][2]["run"] = "no_such_run"
    raw["report"]["seed000_multihead_reconstruction"][1]["multihead"] = "ae_swin"  # a `methods` entry
    raw["report"]["feature_maps"][0] = {"label": "ResNet-50", "run": "cls_resnet50_swin"}  # not a seg run
    raw["report"]["seed000_multihead_segmentation"][1]["multihead"] = "multihead_cls"  # no seg head
    raw["report"]["segmentation_comparison"][0] = {"label": "both", "run": "seg_unetpp_scratch",
                                                   "multihead": "multihead_seg"}
    found = "\n".join(problems(raw))
    assert "report.seed000_pretrained_segmentation[2].run: 'no_such_run' is not an entry under `runs`" in found
    assert "report.seed000_multihead_reconstruction[1].multihead: 'ae_swin' is not an entry under `multihead`" in found
    assert "report.feature_maps[0].run: 'cls_resnet50_swin' is a 'cls' run" in found
    assert "report.seed000_multihead_segmentation[1].multihead: 'multihead_cls' has no seg head" in found
    assert "report.segmentation_comparison[0]: names `run` and `multihead`; name exactly one" in found


def test_a_seed_table_row_may_name_no_entry(raw):
    raw["report"]["seed000_reconstruction"][0]["method"] = None
    raw["report"]["seed000_classification_modules"] = []
    params = validate(raw)
    assert params["report"]["seed000_reconstruction"][0] == {"seed_row": "swin_transformer", "method": None}


def test_the_rules_the_library_used_to_check_late_are_checked_up_front(raw):
    # Each of these once passed params.py and failed later, inside a stage, with another message.
    raw["alignment"]["max_shift"] = 1.0
    raw["data"]["cxr"]["val_fraction"] = 1.0
    raw["evaluate"]["confidence"] = 1.0
    raw["runs"]["seg_unetpp_scratch"]["class_weights"] = [0, 0]
    raw["backbones"]["swin"]["feature_size"] = 18
    raw["backbones"]["vit"]["num_heads"] = 3
    raw["methods"]["dae_all"]["local_fraction"] = 1.0
    found = problems(raw)
    assert "alignment.max_shift: got 1.0, expected a number >= 0 and < 1 (share of the image side; seed 002: 0.05)" \
        in found
    assert any(p.startswith("data.cxr.val_fraction: got 1.0, expected a number >= 0 and < 1") for p in found)
    assert any(p.startswith("evaluate.confidence: got 1.0, expected a number > 0 and < 1") for p in found)
    assert any(p.startswith("runs.seg_unetpp_scratch.class_weights: got [0.0, 0.0], expected class weights that are "
                            "not all 0") for p in found)
    assert "backbones.swin.feature_size: got 18, expected a multiple of 12 (SwinUNETR)" in found
    assert "backbones.vit.hidden_size: got 64, which is not divisible by num_heads 3" in found
    assert any(p.startswith("methods.dae_all.local_fraction: got 1.0") for p in found)


def test_labels_of_a_chest_xray_dataset_are_its_own_and_listed_once(raw):
    raw["data"]["cxr"].update(source="chestxray14", root="/data/cxr14", labels=["Effusion", "Effusion"])
    assert problems(raw) == ["data.cxr.labels: got ['Effusion', 'Effusion'], with ['Effusion'] more than once"]
    raw["data"]["cxr"].update(source="chexpert", labels=["Effusion"])
    (problem,) = problems(raw)
    assert problem.startswith("data.cxr.labels: ['Effusion'] are not chexpert labels; allowed: 'No Finding'")


def test_a_run_whose_arch_does_not_fit_its_init_is_refused(raw):
    raw["runs"]["seg_unetpp_scratch"]["init"] = "scratch_swin"  # unetpp reads a UNet-style encoder
    raw["backbones"]["swin_p4"] = {**raw["backbones"]["swin"], "patch_size": 4}
    raw["methods"]["scratch_swin_p4"] = {"method": "scratch", "backbone": "swin_p4", "recipe": "none"}
    raw["runs"]["seg_swinunetr_scratch"]["init"] = "scratch_swin_p4"
    found = problems(raw)
    assert any(p.startswith("runs.seg_unetpp_scratch.arch: 'unetpp' needs a backbone of 'unet_encoder', "
                            "'cnn_attention', but init 'scratch_swin' has a 'swin' backbone") for p in found)
    assert any(p.startswith("runs.seg_swinunetr_scratch.arch: SwinUNETR's decoder needs a Swin encoder with "
                            "patch_size 2") for p in found)


def test_entries_are_checked_in_shape_only_without_the_method_configs(raw):
    # What the stages that import no torch read: a method's own keys are left to its config.
    raw["methods"]["ae_swin"]["loss"]["l1"] = "heavy"
    assert validate(copy.deepcopy(raw))["methods"]["ae_swin"]["loss"]["l1"] == "heavy"
    assert problems(raw)[0].startswith("methods.ae_swin.loss.l1: got 'heavy'")


def test_every_set_param_in_the_readme_names_the_file_that_holds_its_key(raw):
    """``dvc exp run -S key=value`` edits params.yaml unless the key is prefixed with its
    file (``params/runs.yaml:runs....``); DVC refuses a key params.yaml does not hold."""
    import re

    from chestssl.params import params_file_of

    readme = (ROOT / "README.md").read_text()
    settings = re.findall(r"-S\s+'?([^'\s]+)", readme)
    assert len(settings) >= 6, settings
    for setting in settings:
        file, _, override = setting.rpartition(":") if ":" in setting.split("=")[0] else ("", "", setting)
        key = override.split("=")[0].lstrip("+~")
        group = key.split(".")[0]
        assert (file or "params.yaml") == params_file_of(group), f"README: -S {setting}: {group} is in {params_file_of(group)}"
        if not override.startswith("+"):
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"README: -S {setting}: no key {key}"
                node = node[part]


def test_warm_up_and_floor_are_checked_against_the_schedule_in_recipes(raw):
    raw["recipes"]["segmentation"].update(warmup_epochs=2.0, min_lr=1e-5)  # cosine, 30 epochs: fine
    raw["recipes"]["dae"].update(scheduler="plateau", warmup_epochs=1.0)
    raw["recipes"]["classifier"].update(min_lr=1.0)
    assert problems(raw) == [
        "recipes.dae.warmup_epochs: got 1, but a warm-up needs scheduler 'cosine' or 'none' (plateau lowers the "
        "rate from the validation metric)",
        "recipes.classifier.min_lr: got 1, expected less than lr (0.001)",
    ]


def test_an_entry_whose_own_train_keys_contradict_its_recipe_is_named(raw):
    raw["recipes"]["segmentation"].update(warmup_epochs=2.0, min_lr=1e-5)
    raw["runs"]["seg_unetpp_scratch"]["train"] = {"scheduler": "none"}  # the recipe's floor needs the cosine
    assert problems(raw) == ["runs.seg_unetpp_scratch.train.min_lr: got 1e-05, but only the cosine schedule has a "
                             "floor (scheduler is 'none'); set it to 0"]


def test_sparse_validation_is_refused_with_the_plateau_schedule(raw):
    raw["recipes"]["mae"]["val_every_epochs"] = 3  # cosine: fine
    raw["methods"]["diffmae"]["train"] = {"scheduler": "plateau"}
    assert problems(raw) == ["methods.diffmae.train.val_every_epochs: got 3, but the plateau schedule reads the "
                             "validation metric after every epoch; set it to 1"]


def test_a_warm_up_as_long_as_the_training_is_refused(raw):
    epochs = raw["recipes"]["segmentation"]["epochs"]
    raw["recipes"]["segmentation"]["warmup_epochs"] = epochs
    (problem,) = problems(raw)
    assert problem == f"recipes.segmentation.warmup_epochs: got {epochs}, expected fewer than the {epochs} epochs"


def test_per_entry_radiograph_settings_are_checked_with_their_key(raw):
    per_entry = raw["pretrain_radiographs"]["per_entry"]
    per_entry["mae"] = {"train": {"epoch": 3, "batch_size": 0}, "recipe": "mae"}
    per_entry["dae_all"] = {"train": {"epochs": 3}}
    per_entry["bad name!"] = {}
    found = problems(raw)
    assert any(p.startswith("pretrain_radiographs.per_entry.mae.train.epoch: unknown key; allowed here: epochs,")
               for p in found)
    assert "pretrain_radiographs.per_entry.mae.train.batch_size: got 0, expected an integer >= 1" in found
    assert "pretrain_radiographs.per_entry.mae.recipe: unknown key; allowed here: train, backbone" in found
    assert "pretrain_radiographs.per_entry.bad name!: entry names may contain only letters, digits, '_' and '-'" \
        in found

    per_entry.clear()
    per_entry["dae_all"] = {"train": {"epochs": 3}}  # listed in neither list
    per_entry["scratch_vit"] = {"train": {"epochs": 3}}  # trains nothing
    per_entry["barlow_twins"] = {"backbone": {"patch_size": 32, "name": "resnet50"}}  # not a ResNet key; fixed
    per_entry["mae"] = {"backbone": {"img_size": 128}}  # radiographs.side decides
    per_entry["diffmae"] = {"backbone": {"hidden_size": 66}}
    assert problems(raw) == [
        "pretrain_radiographs.per_entry.dae_all: 'dae_all' is listed in neither pretrain_radiographs.methods nor "
        "pretrain_radiographs.study_methods; list it there or remove its settings",
        "pretrain_radiographs.per_entry.scratch_vit.train: 'scratch_vit' is a scratch entry, not trained; remove its "
        "`train` keys",
        "pretrain_radiographs.per_entry.barlow_twins.backbone.patch_size: not a key this override may set; the "
        "'resnet18' backbone of methods.barlow_twins allows: block_inplanes",
        "pretrain_radiographs.per_entry.barlow_twins.backbone.name: not a key this override may set; the "
        "'resnet18' backbone of methods.barlow_twins allows: block_inplanes",
        "pretrain_radiographs.per_entry.mae.backbone.img_size: a ViT trained on radiographs takes radiographs.side "
        "(64) as its img_size; change radiographs.side instead",
        "pretrain_radiographs.per_entry.diffmae.backbone.hidden_size: got 66, which is not divisible by num_heads 4",
    ]


def test_a_radiograph_vit_is_sized_by_the_radiographs_and_its_patches_must_tile_them(raw):
    from chestssl.params import radiograph_entry

    raw["radiographs"]["side"] = 128  # slices.side stays 64, and so does the CT's ViT
    raw["pretrain_radiographs"]["per_entry"] = {"mae": {"backbone": {"patch_size": 16}}}
    params = validate(copy.deepcopy(raw))
    assert radiograph_entry(params, "mae")["backbone"]["img_size"] == 128
    assert radiograph_entry(params, "mae")["backbone"]["patch_size"] == 16
    assert radiograph_entry(params, "diffmae", "study_methods")["backbone"]["patch_size"] == 8  # the preset's
    assert params["methods"]["mae"]["backbone"]["img_size"] == params["slices"]["side"] == 64

    raw["radiographs"]["side"] = 80
    raw["pretrain_radiographs"]["per_entry"] = {"mae": {"backbone": {"patch_size": 32}}}
    raw["backbones"]["vit"]["patch_size"] = 16  # divides 64 and 80
    assert problems(raw) == ["pretrain_radiographs.per_entry.mae.backbone.patch_size: got 32, which does not divide "
                             "radiographs.side 80, the ViT's img_size on radiographs"]
    raw["backbones"]["vit"]["patch_size"] = 32  # divides 64, not 80
    raw["pretrain_radiographs"]["per_entry"] = {}
    assert "pretrain_radiographs.per_entry.scratch_vit.backbone.patch_size: got 32 (the preset's), which does not " \
           "divide radiographs.side 80, the ViT's img_size on radiographs" in problems(raw)

    # What the method asks of its backbone is checked on the radiographs' one too: one patch masks nothing.
    raw["radiographs"]["side"] = 64
    raw["backbones"]["vit"]["patch_size"] = 8
    raw["pretrain_radiographs"]["per_entry"] = {"mae": {"backbone": {"patch_size": 64}}}
    (problem,) = problems(raw)
    assert problem.startswith("pretrain_radiographs.per_entry.mae.backbone: with this backbone on radiographs, "
                              "methods.mae.mask_ratio: got 0.5, expected a fraction that masks at least one")


def test_a_warm_up_as_long_as_a_radiograph_run_is_refused(raw):
    raw["recipes"]["mae"]["epochs"] = 6
    raw["recipes"]["mae"]["warmup_epochs"] = 5  # 6 epochs on CT: fine
    raw["pretrain_radiographs"]["train"]["epochs"] = 5
    raw["pretrain_radiographs"]["per_entry"] = {"diffmae": {"train": {"epochs": 20}}}
    assert problems(raw) == [
        "pretrain_radiographs.per_entry.mae.train.warmup_epochs: got 5, expected fewer than the 5 epochs (the train "
        "block of 'mae' on radiographs: its own, then pretrain_radiographs.train, then this)",
    ]
    raw["pretrain_radiographs"]["per_entry"] = {"mae": {"train": {"scheduler": "plateau"}}}
    raw["pretrain_radiographs"]["train"]["epochs"] = 8
    (problem,) = problems(raw)
    assert problem.startswith("pretrain_radiographs.per_entry.mae.train.warmup_epochs: got 5, but a warm-up needs "
                              "scheduler 'cosine' or 'none'")


def test_the_full_profile_without_its_radiograph_recipes_is_refused():
    """The MAE recipe's 10-epoch warm-up outlasts the quick profile's 8 radiograph epochs."""
    from chestssl.profiles import merge_profile

    profile = yaml.safe_load((ROOT / "params" / "lidc-full.yaml").read_text())
    del profile["pretrain_radiographs"], profile["include"]  # its included entries: read_shipped_params has them
    profile["radiographs"]["side"] = 128
    merged = merge_profile(read_shipped_params(), profile)
    with pytest.raises(ParamsError) as error:
        validate(merged)
    assert "pretrain_radiographs.per_entry.mae.train.warmup_epochs: got 10, expected fewer than the 8 epochs" \
        in str(error.value)


def test_classification_class_weights_may_be_balanced_and_clean_source_is_one_of_two(raw):
    raw["runs"]["cls_resnet18_swin"]["class_weights"] = "balanced"
    params = validate(copy.deepcopy(raw))
    assert params["runs"]["cls_resnet18_swin"]["class_weights"] == "balanced"
    assert params["runs"]["cls_resnet50_swin"]["class_weights"] == [1.0, 1.0]
    assert params["slices"]["clean_source"] == "any_slice"
    raw["runs"]["cls_resnet50_swin"]["class_weights"] = "balance"
    raw["runs"]["cls_resnet50_scratch"]["class_weights"] = [1.0]
    raw["runs"]["seg_unetpp_scratch"]["class_weights"] = "balanced"  # segmentation weighs pixels: lists only
    raw["slices"]["clean_source"] = "nodule_free"
    found = problems(raw)
    either = "expected 'balanced' (weights from the training set's class counts) or a list of 2 numbers >= 0 (clean, " \
             "nodule), not both 0"
    assert f"runs.cls_resnet50_swin.class_weights: got 'balance', {either}" in found
    assert f"runs.cls_resnet50_scratch.class_weights: got [1.0], {either}" in found
    assert "runs.seg_unetpp_scratch.class_weights: got 'balanced', expected a list of 2 numbers >= 0" in found
    assert any(p.startswith("slices.clean_source: got 'nodule_free', expected one of 'any_slice', "
                            "'nodule_free_patients'") for p in found)
    del raw["slices"]["clean_source"]
    assert any(p.startswith("slices.clean_source: missing") for p in problems(raw))
    # The full profile: seed 000's clean slices and weights balanced to our own sampling.
    full = validate(params_with_profile(ROOT / "params" / "lidc-full.yaml", ROOT / "params.yaml"))
    assert full["slices"]["clean_source"] == "nodule_free_patients"
    assert {name for name, run in full["runs"].items() if run.get("class_weights") == "balanced"} == {
        "cls_resnet18_swin", "cls_resnet50_swin", "cls_resnet50_scratch", "cls_resnet50_multihead_cls"}


def test_epoch_unit_is_slices_or_scans_on_trained_2d_entries_only(raw):
    from chestssl.params import radiograph_entry

    raw["methods"]["dae_all"]["epoch_unit"] = "scans"
    raw["methods"]["mae"]["epoch_unit"] = "scans"  # on CT; its radiograph epochs are one item per study view
    raw["multihead"]["multihead_seg"]["epoch_unit"] = "slices"
    params = validate(copy.deepcopy(raw))
    assert (params["methods"]["dae_all"]["epoch_unit"], params["multihead"]["multihead_seg"]["epoch_unit"]) == (
        "scans", "slices")
    assert params["methods"]["mae"]["epoch_unit"] == "scans" and "epoch_unit" not in radiograph_entry(params, "mae")
    assert "epoch_unit" not in params["methods"]["dae_local"]  # unset stays unset: the entry (and its outputs) unchanged
    raw["methods"]["dae_local"]["epoch_unit"] = "volumes"
    raw["methods"]["scratch_swin"]["epoch_unit"] = "scans"
    raw["backbones"]["swin_3d"] = {**raw["backbones"]["swin"], "spatial_dims": 3}
    raw["methods"]["dae_3d"] = {**raw["methods"]["dae_denoise"], "backbone": "swin_3d", "epoch_unit": "scans"}
    found = problems(copy.deepcopy(raw))
    assert any(p.startswith("methods.dae_local.epoch_unit: got 'volumes', expected one of 'slices', 'scans'")
               for p in found), found
    del raw["methods"]["dae_local"]["epoch_unit"]
    found = problems(raw)
    assert "methods.scratch_swin.epoch_unit: a scratch entry is not trained; remove its epoch_unit" in found
    assert ("methods.dae_3d.epoch_unit: got 'scans', but the entry has a 3D backbone, whose epoch is crops.per_scan "
            "crops of each training scan (drawn anew with crops.draw: every_epoch); epoch_unit counts the slices of 2D "
            "entries, so remove it") in found
    # The full profile counts the 2D DAE entries' epochs over scans, as seed 003 counted them over volumes.
    full = validate(params_with_profile(ROOT / "params" / "lidc-full.yaml", ROOT / "params.yaml"))
    assert {name for name, entry in full["methods"].items() if entry.get("epoch_unit") == "scans"} == {
        "dae_denoise", "dae_superres", "dae_local", "dae_all"}


def test_the_quick_profile_runs_every_stage_kind_and_a_row_of_every_seed_table():
    """The quick profile leaves entries to params/all-entries.yaml, never a whole stage or table."""
    import re

    params = load_params(ROOT / "params.yaml")
    for group in sorted(set(re.findall(r"foreach: \$\{([\w.]+)\}", (ROOT / "dvc.yaml").read_text()))):
        node = params
        for part in group.split("."):
            node = node[part]
        assert node, f"{group}: the quick profile expands no stage from it"
    # Both a segmentation and a classification run, and a 2D and a 3D pretrained entry.
    assert {run["task"] for run in params["runs"].values()} == {"seg", "cls"}
    trained = [entry for entry in params["methods"].values() if entry["method"] != "scratch"]
    assert {entry["backbone"]["spatial_dims"] for entry in trained} == {2, 3}
    for table, rows in params["report"].items():
        named = [row for row in rows if any(row.get(key) for key in ("method", "run", "multihead", "latent_diffusion"))]
        assert named, f"report.{table}: no row of the quick profile names an entry"
