"""Profiles (chestssl.profiles): the LIDC and radiograph-dataset profiles, `remove:` and `--set`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from chestssl.params import ParamsError, load_params
from chestssl.profiles import apply_profile, main

ROOT = Path(__file__).resolve().parents[1]
#: Each radiograph profile: its dataset, the runs it keeps, the mode of those runs.
CXR_PROFILES = {
    "cxr-covid-radiography": ("covid_radiography", {"cxr_linear_barlow_twins", "cxr_linear_scratch_resnet18"},
                              "multiclass"),
    "cxr-chexpert": ("chexpert", {"cxr_linear_barlow_twins", "cxr_linear_scratch_resnet18", "cxr_densenet121"},
                     "multilabel"),
    "cxr-chestxray14": ("chestxray14", {"cxr_densenet121", "cxr_densenet121_aligned"}, "multilabel"),
    "cxr-mimic-cxr": ("mimic_cxr", {"cxr_densenet121"}, "multilabel"),
}


def _params_copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "params", tmp_path / "params")
    return tmp_path / "params.yaml"


@pytest.mark.parametrize("full", [False, True], ids=["over the quick profile", "over the full profile"])
@pytest.mark.parametrize("profile", sorted(CXR_PROFILES))
def test_each_radiograph_profile_applies_over_either_ct_profile(tmp_path, profile, full):
    params_path = _params_copy(tmp_path)
    if full:
        apply_profile(ROOT / "params/lidc-full.yaml", params_path)
    apply_profile(ROOT / f"params/{profile}.yaml", params_path, ["data.cxr.root=/data/cxr"])
    params = load_params(params_path)
    source, runs, mode = CXR_PROFILES[profile]
    assert params["data"]["cxr"]["source"] == source and params["data"]["cxr"]["root"] == "/data/cxr"
    assert set(params["radiograph_runs"]) == runs and {r["mode"] for r in params["radiograph_runs"].values()} == {mode}
    listed = set(params["pretrain_radiographs"]["methods"]) | set(params["pretrain_radiographs"]["study_methods"])
    assert set(params["pretrain_radiographs"]["per_entry"]) <= listed
    assert {r["init"] for r in params["radiograph_runs"].values()} - {None} <= set(params["pretrain_radiographs"]["methods"])
    # The CT side is the CT profile's: the quick phantom, or LIDC-IDRI from TCIA.
    assert params["data"]["source"] == ("tcia" if full else "phantom")


def test_the_profiles_carry_the_seeds_recipes():
    covid = yaml.safe_load((ROOT / "params/cxr-covid-radiography.yaml").read_text())
    assert covid["pretrain_radiographs"]["train"] == {"epochs": 300, "batch_size": 128}  # seed 001 on COVID
    chexpert = yaml.safe_load((ROOT / "params/cxr-chexpert.yaml").read_text())
    assert chexpert["data"]["cxr"]["frontal_only"] and chexpert["data"]["cxr"]["uncertain"] == "positive"
    assert chexpert["pretrain_radiographs"]["per_entry"]["barlow_twins"]["train"] == {"epochs": 60, "batch_size": 128}
    nih = yaml.safe_load((ROOT / "params/cxr-chestxray14.yaml").read_text())
    assert nih["alignment"]["lr"] == 1e-4 and nih["alignment"]["block_inplanes"] == [64, 128, 256, 512]
    mimic = yaml.safe_load((ROOT / "params/cxr-mimic-cxr.yaml").read_text())
    assert mimic["pretrain_radiographs"]["study_methods"] == ["mae", "diffmae"]
    assert mimic["pretrain_radiographs"]["per_entry"]["diffmae"]["backbone"] == {"patch_size": 32}


def test_a_dataset_profile_without_its_folder_says_how_to_give_it(tmp_path):
    params_path = _params_copy(tmp_path)
    before = params_path.read_text()
    with pytest.raises(ParamsError, match="data.cxr.root: empty"):
        apply_profile(ROOT / "params/cxr-chexpert.yaml", params_path)
    assert params_path.read_text() == before, "nothing is written when the result is invalid"


def test_remove_deletes_keys_where_present_so_a_profile_applies_twice(tmp_path):
    params_path = _params_copy(tmp_path)
    profile = tmp_path / "p.yaml"
    profile.write_text("remove: [radiograph_runs.cxr_densenet121, radiograph_runs.cxr_none, nothing.here]\nseed: 7\n")
    apply_profile(profile, params_path)
    params = load_params(params_path)
    assert "cxr_densenet121" not in params["radiograph_runs"] and params["seed"] == 7
    once = {path.name: path.read_text() for path in [params_path, *(tmp_path / "params").iterdir()]}
    apply_profile(profile, params_path)
    assert {path.name: path.read_text() for path in [params_path, *(tmp_path / "params").iterdir()]} == once
    profile.write_text("remove: radiograph_runs\n")
    with pytest.raises(ParamsError, match="expected a list of dotted keys"):
        apply_profile(profile, params_path)


def test_set_writes_a_yaml_value_after_the_profile_and_refuses_a_bad_one(tmp_path, capsys):
    params_path = _params_copy(tmp_path)
    profile = tmp_path / "p.yaml"
    profile.write_text("seed: 7\n")
    main([str(profile), "--params", str(params_path), "--set", "seed=11", "--set", "evaluate.confidence=0.9"])
    params = load_params(params_path)
    assert params["seed"] == 11 and params["evaluate"]["confidence"] == 0.9
    assert "applied" in capsys.readouterr().out
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        apply_profile(profile, params_path, ["seed"])
    with pytest.raises(ParamsError, match="evaluate.nothing"):
        apply_profile(profile, params_path, ["evaluate.nothing=1"])


def test_include_applies_the_named_profiles_first_relative_to_the_profile(tmp_path):
    params_path = _params_copy(tmp_path)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "base.yaml").write_text("seed: 5\ntraining_seeds: 2\n")
    profile = tmp_path / "profiles" / "top.yaml"
    profile.write_text("include: [base.yaml]\nseed: 9\n")
    apply_profile(profile, params_path)
    params = load_params(params_path)
    assert (params["seed"], params["training_seeds"]) == (9, 2)  # the including profile's own keys win
    (tmp_path / "profiles" / "base.yaml").write_text("include: [top.yaml]\n")
    with pytest.raises(ParamsError, match="profiles include each other"):
        apply_profile(profile, params_path)
    profile.write_text("include: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match=r"missing.yaml: no such profile \(included by"):
        apply_profile(profile, params_path)


def test_all_entries_adds_the_seed_tables_entries_and_applies_twice(tmp_path):
    params_path = _params_copy(tmp_path)
    quick = load_params(params_path)
    apply_profile(ROOT / "params/all-entries.yaml", params_path)
    params = load_params(params_path)
    assert set(params["methods"]) > set(quick["methods"]) and set(params["runs"]) > set(quick["runs"])
    assert {"seg_unetpp_scratch", "cls_resnet50_swin", "seg_swinunetr_dae_local"} <= set(params["runs"])
    # The quick profile's entries are unchanged, and the report's null rows now name entries.
    assert all(params["methods"][name] == entry for name, entry in quick["methods"].items())
    assert params["report"]["seed000_pretrained_segmentation"][0]["run"] == "seg_unetpp_scratch"
    once = {path.name: path.read_text() for path in [params_path, *(tmp_path / "params").iterdir()]}
    apply_profile(ROOT / "params/all-entries.yaml", params_path)
    assert {path.name: path.read_text() for path in [params_path, *(tmp_path / "params").iterdir()]} == once
