"""The ``local`` source: an LIDC-IDRI folder the user already has, linked, not copied.

Any NBIA retriever layout is accepted, with or without the top ``LIDC-IDRI`` folder:

- classic: ``LIDC-IDRI/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm``;
- NBIA Data Retriever 4 (descriptive names), e.g.
  ``LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-NA-NA-30178/3000566.000000-NA-03192/1-001.dcm``.

A series folder is any folder holding ``.dcm`` files. One header per series is read
(without pixels) for PatientID, StudyInstanceUID, SeriesInstanceUID and Modality, so
folder names never matter. Each CT series is linked as
``<raw_dir>/LIDC-IDRI/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>`` -> the user's
folder, the path pylidc tries first. Series that are not used (the radiographs LIDC-IDRI
also holds, unreadable headers, duplicates) are listed with the reason in
``<raw_dir>/local_skipped.csv``.
"""

from __future__ import annotations

from chestssl.errors import UserError

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from chestssl.data.lidc import LIDC_DIRNAME
from chestssl.data.manifest import SeriesRecord, series_checksum, write_manifest
from chestssl.io import write_csv

LOG = logging.getLogger(__name__)

SOURCE = "local"
SKIPPED_FILENAME = "local_skipped.csv"
SKIPPED_COLUMNS = ["path", "reason", "patient_id", "series_instance_uid", "modality"]
HEADER_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"]
EXPECTED_LAYOUT = (
    "expected an LIDC-IDRI folder as the NBIA retrievers write it, with or without the top "
    "LIDC-IDRI folder: LIDC-IDRI/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm, or "
    "LIDC-IDRI/LIDC-IDRI-0001/01-01-2000-NA-NA-30178/3000566.000000-NA-03192/1-001.dcm"
)
# PatientID and UIDs become folder names: letters, digits, '.', '_' and '-' only.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class LocalSourceError(UserError, ValueError):
    """The local folder holds no usable LIDC-IDRI CT series; the message says why."""


@dataclass(frozen=True)
class LocalSeries:
    """One CT series found in the user's folder (``folder`` is its resolved path)."""

    folder: Path
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    images: int

    @property
    def relative_dir(self) -> Path:
        return Path(LIDC_DIRNAME, self.patient_id, self.study_instance_uid, self.series_instance_uid)


def link_local(source_dir: str | os.PathLike, raw_dir: str | os.PathLike) -> list[SeriesRecord]:
    """Link every CT series under ``source_dir`` into ``raw_dir``; write the manifest.

    Existing correct links are kept; links to other folders, and links of series no
    longer found, are replaced or removed (links only: no file of the user's is ever
    changed). ``<raw_dir>/local_skipped.csv`` lists every series folder not linked and
    why. Returns one record per linked series (images: number of ``.dcm`` files;
    checksum: :func:`~chestssl.data.manifest.series_checksum`), sorted by patient and series.
    """
    source = _check_source_dir(source_dir)
    raw_dir = Path(raw_dir)
    lidc_dir = raw_dir / LIDC_DIRNAME
    exclude = None
    if lidc_dir.is_dir() and not source.is_relative_to(lidc_dir.resolve()):
        exclude = lidc_dir.resolve()  # our own links, when raw_dir lies inside source_dir

    folders = find_series_folders(source, exclude=exclude)
    if not folders:
        raise LocalSourceError(f"no DICOM series (folders holding .dcm files) under {source}; {EXPECTED_LAYOUT}")

    series, skipped = classify_series_folders(folders)
    skipped_csv = raw_dir / SKIPPED_FILENAME
    write_csv(skipped_csv, pd.DataFrame(skipped, columns=SKIPPED_COLUMNS))
    if skipped:
        LOG.warning("%d series folder(s) under %s not used; see %s", len(skipped), source, skipped_csv)
    if not series:
        raise LocalSourceError(
            f"no CT series under {source}: all {len(skipped)} series folder(s) were skipped, with "
            f"the reasons in {skipped_csv}; {EXPECTED_LAYOUT}"
        )

    wanted = {raw_dir / s.relative_dir: s.folder for s in series}
    _remove_stale_links(lidc_dir, wanted)
    kept = sum(_link(target, folder) for target, folder in wanted.items())
    LOG.info("%d CT series linked under %s (%d links kept as they were)", len(series), lidc_dir, kept)

    records = [
        SeriesRecord(
            patient_id=s.patient_id,
            study_instance_uid=s.study_instance_uid,
            series_instance_uid=s.series_instance_uid,
            images=s.images,
            source=SOURCE,
            checksum=series_checksum(s.folder),
        )
        for s in series
    ]
    write_manifest(raw_dir / "manifest.csv", records)
    return sorted(records, key=lambda r: (r.patient_id, r.series_instance_uid))


def find_series_folders(root: str | os.PathLike, exclude: Path | None = None) -> list[Path]:
    """Resolved folders under ``root`` (itself included) holding at least one ``.dcm`` file.

    Links are followed, each real folder visited once (so link cycles end); ``exclude``
    (a resolved path) and everything below it is not visited. File names starting with
    '.' (e.g. macOS ``._1-001.dcm`` resource files) do not count, as in pylidc.
    """
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited or (exclude is not None and Path(real).is_relative_to(exclude)):
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames.sort()
        if any(_is_dicom_name(name) for name in filenames):
            found.append(Path(real))
    return sorted(found)


def classify_series_folders(folders: list[Path]) -> tuple[list[LocalSeries], list[dict[str, str]]]:
    """Split series folders into CT series to link and skipped rows (``SKIPPED_COLUMNS``)."""
    series: list[LocalSeries] = []
    skipped: list[dict[str, str]] = []
    seen: dict[str, Path] = {}
    for folder in folders:
        names = sorted(name for name in os.listdir(folder) if _is_dicom_name(name))
        header = {tag: "" for tag in HEADER_TAGS}

        def skip(reason: str) -> None:
            skipped.append({
                "path": str(folder), "reason": reason, "patient_id": header["PatientID"],
                "series_instance_uid": header["SeriesInstanceUID"], "modality": header["Modality"],
            })

        first = folder / names[0]
        try:
            dataset = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        except InvalidDicomError as exc:
            skip(f"{first.name} is not a DICOM file: {exc}")
            continue
        except Exception as exc:  # any reading failure is a reason to list, not to stop on
            skip(f"unreadable DICOM header in {first.name}: {type(exc).__name__}: {exc}")
            continue
        header.update({tag: str(getattr(dataset, tag, "") or "").strip() for tag in HEADER_TAGS})
        missing = [tag for tag in HEADER_TAGS if not header[tag]]
        if missing:
            skip(f"{first.name} lacks {', '.join(missing)}")
            continue
        if header["Modality"] != "CT":
            skip(f"modality {header['Modality']}, not CT")
            continue
        unsafe = [tag for tag in HEADER_TAGS[:3] if not _SAFE_NAME.match(header[tag]) or header[tag] in (".", "..")]
        if unsafe:
            skip(f"{', '.join(unsafe)} of {first.name} cannot be a folder name "
                 "(expected letters, digits, '.', '_' or '-')")
            continue
        lower_case = [name for name in names if name.endswith(".dcm")]
        if not lower_case:
            skip("file names end in upper-case .DCM, but pylidc reads only names ending in .dcm; rename them")
            continue
        uid = header["SeriesInstanceUID"]
        if uid in seen:
            skip(f"duplicate of series {uid} in {seen[uid]}")
            continue
        seen[uid] = folder
        series.append(LocalSeries(
            folder=folder,
            patient_id=header["PatientID"],
            study_instance_uid=header["StudyInstanceUID"],
            series_instance_uid=uid,
            images=len(lower_case),
        ))
    return series, skipped


def _check_source_dir(source_dir: str | os.PathLike) -> Path:
    if not str(source_dir).strip():
        raise LocalSourceError(
            "data.local.path is empty; set it to the LIDC-IDRI folder you downloaded "
            f"with the NBIA Data Retriever ({EXPECTED_LAYOUT})"
        )
    source = Path(source_dir).expanduser()
    if not source.exists():
        raise FileNotFoundError(
            f"data.local.path: {source} does not exist; set it to your LIDC-IDRI folder "
            "(or use data.source: tcia to download it)"
        )
    if not source.is_dir():  # a user error (one line, no traceback), not an OSError
        raise LocalSourceError(
            f"data.local.path: {source} is a file, not a folder; it must be the folder holding the "
            f"LIDC-IDRI DICOM series, e.g. the one the NBIA Data Retriever wrote ({EXPECTED_LAYOUT})"
        )
    return source.resolve()


def _is_dicom_name(name: str) -> bool:
    return name.lower().endswith(".dcm") and not name.startswith(".")


def _link(target: Path, folder: Path) -> bool:
    """Make ``target`` a link to ``folder``; return True if a correct one was already there."""
    if target.is_symlink():
        if os.path.realpath(target) == str(folder):
            return True
    elif target.exists():
        if target.resolve() == folder:
            return True  # the user's series already sits at the place pylidc reads
        # a real folder left by another source (phantom or tcia) in the same raw folder
        LOG.warning("replacing %s (a folder from another data source) with a link to %s", target, folder)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # create the new link beside the target and rename it over, so the swap is atomic
    staging = target.with_name(f".{target.name}.link")
    staging.unlink(missing_ok=True)
    staging.symlink_to(folder, target_is_directory=True)
    os.replace(staging, target)
    return False


def _remove_stale_links(lidc_dir: Path, wanted: dict[Path, Path]) -> None:
    """Remove links under ``lidc_dir`` that are not wanted, then folders left empty."""
    if not lidc_dir.is_dir():
        return
    removed = 0
    for dirpath, dirnames, filenames in os.walk(lidc_dir, topdown=False):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink() and path not in wanted:
                path.unlink()
                removed += 1
        here = Path(dirpath)
        if here != lidc_dir and not any(here.iterdir()):
            here.rmdir()
    if removed:
        LOG.info("removed %d link(s) under %s to series no longer in the local folder", removed, lidc_dir)
