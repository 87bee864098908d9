"""The seeds' published numbers: one data file, checked when read, and the only place they are written."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import tokenize
import tomllib
from pathlib import Path

import pytest
import yaml

from chestssl.params import ParamsError
from chestssl.report import published as published_module
from chestssl.report.ablations import frozen_parts_table, label_fraction_table
from chestssl.report.alignment_figures import alignment_table
from chestssl.report.probes import linear_probe_table
from chestssl.report.published import PUBLISHED_FILE, REQUIRED_FIELDS, PublishedError, published, read_published
from chestssl.report.seed000 import SEED000_TABLES, seed000_tables
from tests.report.test_ablations_report import ABLATIONS
from tests.report.test_alignment_figures import _metrics as _alignment_metrics
from tests.report.test_probes import _probe
from tests.report.test_seed000 import SEED_README, SHIPPED_REPORT
from tests.test_stage_deps import STAGES, _import_closure

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT_DIR = REPO_ROOT / "chestssl" / "report"
PUBLISHED_PATH = "chestssl/report/published.yaml"

#: What the report's tables quote outside seed 000's tables, as the seeds published it.
LABEL_FRACTION = {
    "barlow_twins": "seed 001 accuracy: 1% 86.5, 10% 93.0, 100% 94.6 (COVID-19 radiography)",
    "scratch": "seed 001 accuracy (ResNet-18 from scratch): 1% 77.0, 10% 83.5, 100% 92.2 (COVID-19 radiography)",
}
FROZEN_PARTS = {
    0: "seed 001 (Barlow Twins ResNet-18, COVID-19 radiography): fc only: 80.5%",
    1: "—",
    2: "seed 001 (Barlow Twins ResNet-18, COVID-19 radiography): layer3-4 + fc: 94.2%",
    3: "—",
    4: "seed 001 (Barlow Twins ResNet-18, COVID-19 radiography): layer1-4 + fc: 94.8%",
}
PROBE = {
    "mae": "seed 004: mean linear-probe AUROC 0.686 (14 CheXpert labels, MIMIC-CXR)",
    "diffmae": "seed 004: mean linear-probe AUROC 0.704 (14 CheXpert labels, MIMIC-CXR)",
    "barlow_twins": "seed 001: fine-tuned accuracy 97.4% (4-class COVID-19 radiography); no probe",
    "dae": "—",
}
ALIGNMENT_CELL = "0.8110 / 0.8124 (+0.0014)"
ALIGNMENT_NOTE = ("Seed 002's numbers: mean AUROC over 14 ChestX-ray14 labels (patient-level split) of a fine-tuned "
                  "DenseNet-121, 0.8110 without and 0.8124 with alignment, better on 8 of 14 labels.")
SEED_COLUMN = "seed's number (other data)"
PROBE_ENTRIES = {kind: {"method": kind, "backbone": {"name": "resnet18", "spatial_dims": 2}} for kind in PROBE}


# ------------------------------------------------------------------------- the report's tables


def _seed_cells(table, seed_header_prefix):
    """``{metric header: [cells]}`` of the columns quoting the seed."""
    return {header: list(table.text[header]) for header in table.text.columns if header.startswith(seed_header_prefix)}


def test_seed000_tables_built_from_the_file_quote_the_seeds_readme():
    tables = seed000_tables(SHIPPED_REPORT, {}, {}, "synthetic CT")
    assert [table.name for table in tables] == list(SEED_README)
    for spec, table in zip(SEED000_TABLES, tables):
        expected = SEED_README[table.name]
        for metric in spec.metrics:
            header = next(h for h in table.text.columns if h.startswith(metric.seed_header + "[^"))
            assert list(table.text[header]) == [values[metric.seed_key] for _, values in expected], (table.name, header)
            assert list(table.numbers[f"{metric.seed_key}_seed000"]) == [
                float(values[metric.seed_key]) for _, values in expected]


def _frozen_parts():
    settings = {
        f"unfrozen_{n}": {"unfrozen_stages": n, "trained": [f"s{n}"], "label": f"s{n}", "trainable_parameters": n,
                          "accuracy": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6},
                          "auroc": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}, "n_images": 3, "n_patients": 2}
        for n in FROZEN_PARTS
    }
    return frozen_parts_table({"r": ({"run": "r", "init": "bt", "settings": settings}, "f.json")},
                              {"bt": "barlow_twins"}, {"bt": "resnet18"})


def test_the_other_tables_built_from_the_file_quote_the_seeds():
    fraction = label_fraction_table(ABLATIONS, {"barlow": "barlow_twins", "scratch_resnet18": "scratch"}, "cls",
                                    "accuracy")
    assert list(fraction.text[SEED_COLUMN]) == [LABEL_FRACTION["barlow_twins"], LABEL_FRACTION["scratch"]]
    assert list(_frozen_parts().text[SEED_COLUMN]) == list(FROZEN_PARTS.values())
    probe = linear_probe_table({kind: ({"probe": _probe(0.7)}, f"{kind}.json") for kind in PROBE}, PROBE_ENTRIES)
    assert list(probe.text[SEED_COLUMN]) == list(PROBE.values())
    alignment = alignment_table(_alignment_metrics(), "a.json")
    mean = alignment.text.iloc[-1]
    assert mean[next(h for h in alignment.text.columns if h.startswith("Seed 002"))] == ALIGNMENT_CELL
    assert list(alignment.numbers.iloc[-1][["seed_auroc_without", "seed_auroc_with"]]) == [0.8110, 0.8124]
    assert ALIGNMENT_NOTE in alignment.footnotes[0]


# --------------------------------------------------------------------------------- the file


def test_the_file_holds_every_field_of_every_record():
    records = list(published())
    assert len(records) == len({record.id for record in records}) > 0
    assert {"000", "001", "002", "004"} <= {record.seed for record in records}
    for record in records:
        for name in REQUIRED_FIELDS:
            assert getattr(record, name).strip(), f"{record.id}: empty {name}"
        float(record.value)
    raw = yaml.safe_load(PUBLISHED_FILE.read_text())
    assert all(isinstance(entry["value"], str) for entry in raw["records"].values()), "values are quoted text"
    assert PUBLISHED_FILE.read_text().startswith("# "), "the file's layout is commented at its top"


def _write(tmp_path, records) -> Path:
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump({"records": records}, sort_keys=False))
    return path


def _record(**changes):
    record = {"value": "0.7780", "seed": "000", "table": "t", "row": "r", "metric": "dice_global", "dataset": "d",
              "protocol": "p", "source": "s"}
    record.update(changes)
    return {key: value for key, value in record.items() if value is not None}


def test_a_record_missing_a_field_is_an_error_naming_the_record(tmp_path):
    path = _write(tmp_path, {"good": _record(), "bad": _record(protocol=None, source=None)})
    with pytest.raises(PublishedError, match=r"record 'bad': missing protocol, source"):
        read_published(path)


@pytest.mark.parametrize("changes, message", [
    ({"value": 0.778}, r"record 'x': value must be non-empty text \(quote it"),
    ({"value": "n/a"}, r"record 'x': value 'n/a' is not a number"),
    ({"seed": 1}, r"record 'x': seed must be non-empty text \(quote it"),
    ({"seed": "005"}, r"record 'x': seed '005' is not one of"),
    ({"protcol": "p"}, r"record 'x': unknown field\(s\) protcol"),
    ({"dataset": ""}, r"record 'x': dataset must be non-empty text"),
])
def test_a_malformed_record_is_an_error_naming_it(tmp_path, changes, message):
    with pytest.raises(PublishedError, match=message):
        read_published(_write(tmp_path, {"x": _record(**changes)}))


def test_two_records_of_the_same_number_and_a_key_given_twice_are_refused(tmp_path):
    with pytest.raises(PublishedError, match=r"record 'b': the same seed, table, row, setting and metric as record 'a'"):
        read_published(_write(tmp_path, {"a": _record(), "b": _record(value="0.5")}))
    read_published(_write(tmp_path, {"a": _record(), "b": _record(value="0.5", setting="10%")}))
    path = tmp_path / "twice.yaml"
    path.write_text('records:\n  a: {value: "1", seed: "000"}\n  a: {value: "2", seed: "000"}\n')
    with pytest.raises(ParamsError, match="appears twice"):
        read_published(path)
    path.write_text("rows: {}\n")
    with pytest.raises(PublishedError, match="one top-level key `records`"):
        read_published(path)


def test_lookups_by_id_or_by_what_a_number_is():
    records = published()
    by_id = records["alignment.without.mean_auroc"]
    assert (by_id.seed, by_id.table, by_id.value, by_id.number) == ("002", "alignment", "0.8110", 0.811)
    assert records.find(seed="001", table="frozen_parts", row="fc only").value == "80.5"
    assert records.values(table="seed000_reconstruction", row="cnn-attention") == {"ssim": "0.9795", "psnr": "37.978"}
    assert [r.setting for r in records.select(table="label_fraction", row="scratch")] == ["1%", "10%", "100%"]
    with pytest.raises(PublishedError, match=r"no record 'alignment\.with\.mean_aurocc'; did you mean 'alignment\.with\.mean_auroc'"):
        records["alignment.with.mean_aurocc"]
    with pytest.raises(PublishedError, match=r"no record with table='frozen_parts', row='head'"):
        records.find(table="frozen_parts", row="head")
    with pytest.raises(PublishedError, match=r"3 records match table='frozen_parts' \(frozen_parts\.fc_only\.accuracy"):
        records.find(table="frozen_parts")
    with pytest.raises(TypeError, match="cannot look published records up by value"):
        records.select(value="0.8110")


# ------------------------------------------------------------------- no number left in the code


def _numbers_in_source(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of every decimal number in ``path``: numeric literals and numbers inside strings."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.NUMBER:
            found.append((token.start[0], token.string))
        elif token.type in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)):
            found += [(token.start[0], match) for match in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", token.string)]
    return found


def test_no_published_number_is_written_in_the_report_code():
    decimals = {record.number: record.id for record in published() if "." in record.value}
    offending = []
    for path in sorted(REPORT_DIR.glob("*.py")):
        for line, text in _numbers_in_source(path):
            try:
                number = float(text.replace("_", ""))
            except ValueError:
                continue
            if number in decimals:
                offending.append(f"{path.relative_to(REPO_ROOT)}:{line}: {text} (record {decimals[number]})")
    assert not offending, "published numbers written in code; read them from published.yaml:\n" + "\n".join(offending)


def test_the_literal_check_finds_a_number_in_code_and_in_text(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('A = 0.8124\nB = f"x {A} 1% 86.5, 94.6%"\nC = "v1.2.3 and 0.5"\n')
    assert [text for _, text in _numbers_in_source(source)] == ["0.8124", "86.5", "94.6", "0.5"]


_RENDER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import chestssl.report.published as published
    published.PUBLISHED_FILE = Path(sys.argv[1])
    from chestssl.report.ablations import downstream_by_method_table, label_fraction_table
    from chestssl.report.alignment_figures import alignment_table
    from chestssl.report.probes import linear_probe_table
    from chestssl.report.seed000 import seed000_tables
    from tests.report.test_ablations_report import ABLATIONS
    from tests.report.test_alignment_figures import _metrics
    from tests.report.test_probes import _probe
    from tests.report.test_published import PROBE_ENTRIES, _frozen_parts
    from tests.report.test_seed000 import SHIPPED_REPORT

    tables = seed000_tables(SHIPPED_REPORT, {}, {}, "synthetic CT")
    tables.append(label_fraction_table({"a": ABLATIONS["cls_barlow"], "b": ABLATIONS["cls_scratch"]},
                                       {"barlow": "barlow_twins", "scratch_resnet18": "scratch"}, "cls", "accuracy"))
    tables.append(_frozen_parts())
    probes = {kind: ({"probe": _probe(0.7)}, kind) for kind in PROBE_ENTRIES}
    tables.append(linear_probe_table(probes, PROBE_ENTRIES))
    runs = {kind: {"task": "cls", "arch": "linear", "init": kind} for kind in PROBE_ENTRIES}
    tables.append(downstream_by_method_table(PROBE_ENTRIES, probes, runs, {}))
    tables.append(alignment_table(_metrics(), "a.json"))
    from chestssl.report.generation import generation_table
    tables.append(generation_table(SHIPPED_REPORT["seed000_generation"], {}, "synthetic CT"))
    from chestssl.report.radiograph_finetune import radiograph_finetune_table
    from tests.report.test_radiograph_finetune_report import table as radiograph_finetune
    tables.append(radiograph_finetune())
    print(json.dumps({table.name: table.markdown() for table in tables}))
''')
#: The report tables that quote the records of each ``table`` of the file (default: the same name).
QUOTED_IN = {"label_fraction": ["label_fraction_cls_accuracy"], "linear_probe": ["linear_probe", "downstream_by_method"]}


def test_every_record_reaches_its_report_tables_and_nothing_else_does(tmp_path):
    """With every value of the file replaced, every replacement shows in its tables: no
    number is quoted from anywhere but the file, and no record of it goes unquoted."""
    raw = yaml.safe_load(PUBLISHED_FILE.read_text())
    sentinels = {}
    for number, (record_id, record) in enumerate(raw["records"].items()):
        record["value"] = sentinels[record_id] = f"{9100 + number}.25"
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = subprocess.run([sys.executable, "-c", _RENDER, str(path)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rendered = json.loads(done.stdout)
    missing = [f"{record_id} ({sentinels[record_id]}) not in {name}"
               for record_id, record in raw["records"].items()
               for name in QUOTED_IN.get(record["table"], [record["table"]])
               if sentinels[record_id] not in rendered[name]]
    assert not missing, "\n".join(missing)
    original = [record.value for record in published() if "." in record.value]
    for name, text in rendered.items():
        leaked = [value for value in original if re.search(rf"(?<![\d.]){re.escape(value)}(?!\d)", text)]
        assert not leaked, f"{name} still shows {leaked}"


# ------------------------------------------------------------------------ shipped and tracked


def test_the_file_is_package_data_of_chestssl_report():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "published.yaml" in pyproject["tool"]["setuptools"]["package-data"]["chestssl.report"]
    assert published_module.PUBLISHED_FILE == REPO_ROOT / PUBLISHED_PATH


def test_every_stage_that_reads_the_file_depends_on_it():
    readers = []
    for stage, definition in STAGES.items():
        definition = definition.get("do", definition)
        script = next(word for word in definition["cmd"].split() if word.endswith(".py"))
        if "chestssl/report/published.py" not in _import_closure(REPO_ROOT / script):
            continue
        readers.append(stage)
        deps = [str(dep).rstrip("/") for dep in definition["deps"]]
        assert any(PUBLISHED_PATH == dep or PUBLISHED_PATH.startswith(dep + "/") for dep in deps), (
            f"{stage} renders published numbers but does not list {PUBLISHED_PATH} (or its folder) in its deps")
    assert "report" in readers
