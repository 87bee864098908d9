"""The ``tcia`` source: LIDC-IDRI from TCIA's public NBIA Search REST API.

Endpoints used (NBIA Search REST API, base URL ``data.tcia.base_url``, e.g.
``https://services.cancerimagingarchive.net/nbia-api/services/v1``; public collections
such as LIDC-IDRI need no token):

- ``getSeries?Collection=..&Modality=..[&PatientID=..]``: a JSON list of series objects.
  Fields read: ``PatientID``, ``StudyInstanceUID``, ``SeriesInstanceUID``, ``ImageCount``
  (the number of DICOM files in the series), ``FileSize`` (its bytes; sizes the deadline).
- ``getImageWithMD5Hash?SeriesInstanceUID=..``: a zip stream of the series' DICOM files
  (``00000001.dcm``, ...) plus ``md5hashes.csv`` (columns ``Filename``, ``MD5Hash``): the
  MD5 of every file as TCIA archived it.

Each series zip is streamed to a temporary file (never held in memory) and verified
before it is put in place: it is a valid zip whose entries match their CRC-32; no entry
would land outside the series folder; every DICOM file matches its MD5 in
``md5hashes.csv`` (a server that sends no such file is reported, and the series is then
verified by CRC and count only); the number of DICOM files equals ``ImageCount``. The
files are extracted into a temporary folder that is renamed into place in one step,
holding a marker file with the series checksum, so a series folder without its marker is
the leftover of an interrupted run and is downloaded again, and a verified one is skipped.

A slow server cannot hang the download: besides ``data.tcia.timeout_s`` (to connect, and
between received bytes), every request has a deadline of ``timeout_s`` plus its expected
size at ``data.tcia.min_rate_kbps``. The expected size is the larger of the response's
``Content-Length`` and the series' ``FileSize``; without either, ``ImageCount`` times
:data:`IMAGE_BYTES_ESTIMATE`, else :data:`FALLBACK_SERIES_BYTES`. A request past its
deadline is a transient failure, retried like a dropped connection.

Layout written (what pylidc reads)::

    <raw_dir>/LIDC-IDRI/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm
    <raw_dir>/manifest.csv
"""

from __future__ import annotations

from chestssl.errors import UserError

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable
from urllib.parse import urlencode

import requests
from tqdm.auto import tqdm

from chestssl.data.lidc import LIDC_DIRNAME
from chestssl.checks import is_http_url
from chestssl.data.manifest import (VERIFIED_MARKER, SeriesRecord, move_into_place, read_verified_marker,
                                    select_first_patients, series_checksum, write_manifest)
from chestssl.data.transfer import (DEFAULT_MIN_RATE_KBPS, Deadline, RetryPolicy, TransientError, declared_length,
                                    iter_body, read_head, retry_after_s)
from chestssl.io import make_temp_dir, write_json

LOG = logging.getLogger(__name__)

SOURCE = "tcia"
PARAMS_PREFIX = "data.tcia"
SERIES_ENDPOINT = "getSeries"
IMAGE_ENDPOINT = "getImageWithMD5Hash"
MD5_MANIFEST_NAME = "md5hashes.csv"
# Temporary downloads and extractions, beside (not inside) the LIDC-IDRI folder.
PARTIAL_DIRNAME = ".tcia-partial"
CHUNK_BYTES = 1 << 20
USER_AGENT = "chestssl (LIDC-IDRI download)"
EXAMPLE_BASE_URL = "https://services.cancerimagingarchive.net/nbia-api/services/v1"
# Expected bytes of a series without FileSize or Content-Length: per image (an LIDC-IDRI
# CT slice is 512 x 512 x 2 bytes plus its header, about 0.5 MiB), else per series (more
# than any LIDC-IDRI CT series).
IMAGE_BYTES_ESTIMATE = 1 << 20
FALLBACK_SERIES_BYTES = 1 << 30
# Expected bytes of a getSeries answer without Content-Length (all of LIDC-IDRI: ~2 MB).
FALLBACK_LIST_BYTES = 16 << 20

# PatientID and UIDs become folder names: letters, digits, '.', '_' and '-' only.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class TciaError(UserError, RuntimeError):
    """A TCIA download failed in a way the user has to act on; the message says how."""


class UnsafeZipEntryError(TciaError):
    """A zip entry would be written outside its destination folder."""


class CorruptDownloadError(TransientError):
    """The downloaded archive is not a complete, consistent copy of the series."""


@dataclass(frozen=True)
class TciaSeries:
    """One series as listed by ``getSeries``."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    image_count: int | None
    #: Bytes of the series as ``getSeries`` gives them (``FileSize``), if it does.
    file_size: int | None = None

    @property
    def relative_dir(self) -> Path:
        """``LIDC-IDRI/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>``."""
        return Path(LIDC_DIRNAME, self.patient_id, self.study_instance_uid, self.series_instance_uid)

    def describe(self) -> str:
        return f"series {self.series_instance_uid} (patient {self.patient_id})"

    def record(self, images: int, checksum: str) -> SeriesRecord:
        """The manifest row of this series once it is on disk and verified."""
        return SeriesRecord(
            patient_id=self.patient_id,
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            images=images,
            source=SOURCE,
            checksum=checksum,
        )


def download_tcia(
    raw_dir: str | os.PathLike,
    base_url: str,
    collection: str,
    modality: str,
    patients: Iterable[str],
    max_patients: int,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
    progress: bool = True,
    session: requests.Session | None = None,
) -> list[SeriesRecord]:
    """Download the selected series of ``collection`` into ``raw_dir``; write the manifest.

    ``patients``, when not empty, selects exactly those patients (``max_patients`` is
    then not applied); otherwise the first ``max_patients`` patients sorted by ID are
    taken (0: all). Verified series from an earlier run are kept, not downloaded again.
    Each HTTP request gets ``retries`` more attempts after a connection error, a timeout
    (``timeout_s`` seconds to connect or between received bytes), a request slower than
    its deadline (``timeout_s`` plus its expected size at ``min_rate_kbps`` kilobits per
    second; 0: no deadline), HTTP 5xx or 429, or a corrupt download, waiting
    ``backoff_s * 2**attempt`` seconds in between. A malformed ``base_url`` is a
    :class:`TciaError` naming it.
    Returns one record per selected series, sorted by patient and series.
    """
    check_base_url(base_url)
    raw_dir = Path(raw_dir)
    patients = list(patients)
    own_session = session is None
    if session is None:
        session = requests.Session()
        session.headers["User-Agent"] = USER_AGENT
    retry = RetryPolicy(retries, backoff_s, PARAMS_PREFIX, TciaError)
    try:
        series = list_series(session, base_url, collection, modality, patients, timeout_s, retry, min_rate_kbps)
        if patients and max_patients:
            LOG.info(
                "data.tcia.patients lists %d patients; data.tcia.max_patients (%d) applies only "
                "when patients is empty", len(set(patients)), max_patients,
            )
        else:
            series = select_first_patients(series, max_patients)
        if not series:
            raise TciaError(
                f"getSeries at {base_url} lists no {modality} series in collection {collection!r}; "
                "check data.tcia.collection and data.tcia.modality"
            )

        partial_dir = raw_dir / PARTIAL_DIRNAME
        shutil.rmtree(partial_dir, ignore_errors=True)  # leftovers of an interrupted run
        records: list[SeriesRecord] = []
        to_download: list[TciaSeries] = []
        for item in series:
            record = verified_record(raw_dir, item)
            if record is None:
                to_download.append(item)
            else:
                records.append(record)
        LOG.info(
            "%d series selected from %d patients: %d already verified, %d to download",
            len(series), len({s.patient_id for s in series}), len(records), len(to_download),
        )

        with tqdm(total=len(series), initial=len(records), unit="series", desc="series",
                  disable=not progress) as series_bar, \
             tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="downloaded",
                  disable=not progress) as byte_bar:
            for item in to_download:
                series_bar.set_postfix_str(item.patient_id)
                records.append(
                    download_series(session, base_url, item, raw_dir, timeout_s, retry, byte_bar.update,
                                    min_rate_kbps=min_rate_kbps)
                )
                series_bar.update()
        shutil.rmtree(partial_dir, ignore_errors=True)
        _report_unselected(raw_dir, series)
        write_manifest(raw_dir / "manifest.csv", records)
        return sorted(records, key=lambda r: (r.patient_id, r.series_instance_uid))
    finally:
        if own_session:
            session.close()


def list_series(
    session: requests.Session,
    base_url: str,
    collection: str,
    modality: str,
    patients: Iterable[str] = (),
    timeout_s: float = 120.0,
    retry: RetryPolicy | None = None,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
) -> list[TciaSeries]:
    """The ``modality`` series of ``collection`` (of ``patients`` if given), sorted.

    With ``patients``, one ``getSeries`` request per patient; a patient without such a
    series is an error naming it.
    """
    retry = retry or RetryPolicy(0, 0.0, PARAMS_PREFIX, TciaError)
    url = _endpoint(base_url, SERIES_ENDPOINT)
    wanted = sorted(set(patients))
    queries = (
        [{"Collection": collection, "Modality": modality, "PatientID": p} for p in wanted]
        or [{"Collection": collection, "Modality": modality}]
    )
    by_uid: dict[str, TciaSeries] = {}
    for params in queries:
        what = f"listing {modality} series of {params.get('PatientID', collection)} ({url}?{urlencode(params)})"
        rows = retry(what, lambda params=params: _get_json(session, url, params, timeout_s, what, min_rate_kbps))
        if not isinstance(rows, list):
            raise TciaError(
                f"{what}: expected a JSON list from {url}, got {type(rows).__name__}; "
                "check data.tcia.base_url"
            )
        for row in rows:
            item = _parse_series_row(row, url)
            if row.get("Modality", modality) != modality:
                continue  # the server filters by Modality already; guard against one that does not
            if wanted and item.patient_id != params["PatientID"]:
                continue
            by_uid.setdefault(item.series_instance_uid, item)
    series = sorted(by_uid.values(), key=lambda s: (s.patient_id, s.study_instance_uid, s.series_instance_uid))
    missing = sorted(set(wanted) - {s.patient_id for s in series})
    if missing:
        raise TciaError(
            f"no {modality} series in collection {collection!r} at {base_url} for patient(s) "
            f"{', '.join(missing)}; check data.tcia.patients (LIDC-IDRI IDs look like LIDC-IDRI-0001)"
        )
    return series


def verified_record(raw_dir: str | os.PathLike, series: TciaSeries) -> SeriesRecord | None:
    """The record of ``series`` if it is on disk and verified, else None.

    Verified means: a real folder (not a link) holding the marker written after
    verification, for this series, with as many ``.dcm`` files as the marker and
    ``ImageCount`` say. The checksum comes from the marker, so nothing is re-read.
    """
    found = read_verified_marker(Path(raw_dir) / series.relative_dir)
    if found is None:
        return None
    marker, images = found
    if (
        marker.get("series_instance_uid") != series.series_instance_uid
        or marker.get("images") != images
        or not marker.get("checksum")
        or (series.image_count is not None and images != series.image_count)
    ):
        return None
    return series.record(images, str(marker["checksum"]))


def download_series(
    session: requests.Session,
    base_url: str,
    series: TciaSeries,
    raw_dir: str | os.PathLike,
    timeout_s: float,
    retry: RetryPolicy,
    on_bytes: Callable[[int], Any] | None = None,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
) -> SeriesRecord:
    """Stream, verify and extract one series into ``raw_dir``; retry transient failures.

    A folder already at the series' place (a leftover of an interrupted run) is
    replaced only once the new copy is verified. ``on_bytes`` is called with the size
    of every received chunk (a progress bar's ``update``). Each attempt must end within
    ``timeout_s`` plus the series' expected size (:func:`expected_series_bytes`) at
    ``min_rate_kbps`` (0: no deadline), else it is retried as a :class:`~chestssl.data.transfer.TooSlowError`.
    """
    raw_dir = Path(raw_dir)
    final_dir = raw_dir / series.relative_dir
    url = _endpoint(base_url, IMAGE_ENDPOINT)
    params = {"SeriesInstanceUID": series.series_instance_uid}
    what = f"downloading {series.describe()} from {url}?SeriesInstanceUID={series.series_instance_uid}"
    if final_dir.exists() or final_dir.is_symlink():
        LOG.info("%s: the folder %s is not verified (interrupted earlier?); downloading it again",
                 series.describe(), final_dir)

    def attempt() -> SeriesRecord:
        partial_dir = raw_dir / PARTIAL_DIRNAME
        partial_dir.mkdir(parents=True, exist_ok=True)
        zip_path = partial_dir / f"{series.series_instance_uid}.zip.part"
        extract_dir = make_temp_dir(partial_dir, prefix=f"{series.series_instance_uid}.")
        try:
            _stream_to_file(session, url, params, zip_path, timeout_s, what, on_bytes,
                            expected_bytes=lambda declared: expected_series_bytes(series, declared),
                            min_rate_kbps=min_rate_kbps)
            try:
                md5_verified = extract_verified(zip_path, extract_dir, series)
            except UnsafeZipEntryError as exc:
                raise UnsafeZipEntryError(f"{what}: {exc}") from exc
            checksum = series_checksum(extract_dir)
            images = len(list(extract_dir.glob("*.dcm")))
            write_json(
                extract_dir / VERIFIED_MARKER,
                {
                    "series_instance_uid": series.series_instance_uid,
                    "images": images,
                    "checksum": checksum,
                    "md5_verified": md5_verified,
                    "url": f"{url}?SeriesInstanceUID={series.series_instance_uid}",
                },
            )
            move_into_place(extract_dir, final_dir)
        finally:
            zip_path.unlink(missing_ok=True)
            shutil.rmtree(extract_dir, ignore_errors=True)
        return series.record(images, checksum)

    return retry(what, attempt)


def check_base_url(base_url: str) -> str:
    """``base_url`` if it is an http(s) URL with a host, else a :class:`TciaError` naming it."""
    if not is_http_url(base_url):
        raise TciaError(
            f"data.tcia.base_url: got {base_url!r}, expected an http(s) URL with a host, e.g. {EXAMPLE_BASE_URL}"
        )
    return base_url


def expected_series_bytes(series: TciaSeries, content_length: int | None) -> int:
    """The bytes a series download should bring, to size its deadline.

    The larger of ``content_length`` (the response's, if declared) and the series'
    ``FileSize``; without either, ``ImageCount`` x :data:`IMAGE_BYTES_ESTIMATE`, else
    :data:`FALLBACK_SERIES_BYTES`.
    """
    known = [n for n in (content_length, series.file_size) if n]
    if known:
        return max(known)
    if series.image_count:
        return series.image_count * IMAGE_BYTES_ESTIMATE
    return FALLBACK_SERIES_BYTES


def safe_extract(archive_path: str | os.PathLike, dest_dir: str | os.PathLike) -> dict[str, str]:
    """Extract every entry of a zip into ``dest_dir``; return entry name -> MD5 hex digest.

    Every entry is checked before anything is written: an absolute path, a drive
    letter, a ``..`` component, or any path resolving outside ``dest_dir`` raises
    :class:`UnsafeZipEntryError` naming the entry. The MD5 is computed while writing,
    so each file is read once; a CRC-32 mismatch or a truncated archive raises
    :class:`CorruptDownloadError`.
    """
    archive_path, dest_dir = Path(archive_path), Path(dest_dir)
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise CorruptDownloadError(f"{archive_path.name} is not a valid zip archive ({exc})") from exc
    with archive:
        infos = archive.infolist()
        targets = [(info, _entry_target(dest_dir, info.filename, archive_path)) for info in infos]
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise CorruptDownloadError(f"{archive_path.name} holds duplicate entries")
        digests: dict[str, str] = {}
        for info, target in targets:
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.md5()
            try:
                with archive.open(info) as source, open(target, "wb") as sink:
                    for block in iter(lambda: source.read(CHUNK_BYTES), b""):
                        digest.update(block)
                        sink.write(block)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise CorruptDownloadError(
                    f"{archive_path.name}: entry {info.filename!r} is corrupt ({exc})"
                ) from exc
            digests[info.filename] = digest.hexdigest()
    return digests


def extract_verified(archive_path: str | os.PathLike, dest_dir: str | os.PathLike, series: TciaSeries) -> bool:
    """Extract a series zip into ``dest_dir`` and verify it against TCIA's metadata.

    Returns True when every DICOM file matched its MD5 in ``md5hashes.csv``, False when
    the archive had no such file (then CRC-32 and ``ImageCount`` are the only checks,
    and a warning says so). Raises :class:`CorruptDownloadError` on any mismatch.
    """
    dest_dir = Path(dest_dir)
    digests = safe_extract(archive_path, dest_dir)
    dicom_names = {name for name in digests if name.lower().endswith(".dcm")}
    nested = sorted(name for name in dicom_names if "/" in name.replace("\\", "/"))
    if nested:
        raise TciaError(
            f"{series.describe()}: the archive holds DICOM files in subfolders ({nested[0]}, ...), "
            "but pylidc reads them from the series folder itself; check data.tcia.base_url"
        )
    if not dicom_names:
        raise CorruptDownloadError(f"{series.describe()}: the archive holds no .dcm file")

    md5_verified = MD5_MANIFEST_NAME in digests
    if md5_verified:
        expected = _read_md5_manifest(dest_dir / MD5_MANIFEST_NAME)
        missing = sorted(set(expected) - set(digests))
        unlisted = sorted(dicom_names - set(expected))
        wrong = sorted(n for n in expected if n in digests and digests[n] != expected[n])
        if missing or unlisted or wrong:
            problems = []
            if missing:
                problems.append(f"missing from the archive: {', '.join(missing[:5])}")
            if unlisted:
                problems.append(f"not listed in {MD5_MANIFEST_NAME}: {', '.join(unlisted[:5])}")
            if wrong:
                problems.append(f"MD5 mismatch: {', '.join(wrong[:5])}")
            raise CorruptDownloadError(f"{series.describe()}: {'; '.join(problems)}")
    else:
        LOG.warning(
            "%s: the archive has no %s, so the files were checked by CRC-32 and image count only",
            series.describe(), MD5_MANIFEST_NAME,
        )
    if series.image_count is not None and len(dicom_names) != series.image_count:
        raise CorruptDownloadError(
            f"{series.describe()}: the archive holds {len(dicom_names)} DICOM files, "
            f"but TCIA lists ImageCount {series.image_count}"
        )
    return md5_verified


def _endpoint(base_url: str, name: str) -> str:
    return f"{check_base_url(base_url).rstrip('/')}/{name}"


def _get_json(
    session: requests.Session,
    url: str,
    params: dict[str, str],
    timeout_s: float,
    what: str,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
) -> Any:
    started = time.monotonic()
    with session.get(url, params=params, timeout=timeout_s, stream=True) as response:
        deadline = Deadline(started, timeout_s, min_rate_kbps, declared_length(response) or FALLBACK_LIST_BYTES,
                            PARAMS_PREFIX)
        _raise_for_status(response, what, deadline)
        body = bytearray()
        for block in iter_body(response, deadline):
            body += block
    body = bytes(body).strip()
    if not body:  # NBIA answers an empty body when nothing matches
        return []
    try:
        return json.loads(body)  # detects UTF-8, -16 or -32 itself
    except ValueError as exc:
        start = body[:120].decode("utf-8", "replace")
        raise TciaError(
            f"{what}: the answer is not JSON (it starts with {start!r}); "
            f"check data.tcia.base_url (e.g. {EXAMPLE_BASE_URL})"
        ) from exc


def _raise_for_status(response: requests.Response, what: str, deadline: Deadline) -> None:
    status = response.status_code
    if status < 400:
        return
    body = read_head(response, deadline, 300).decode("utf-8", "replace").strip()
    message = f"HTTP {status} {response.reason or ''}".strip()
    if body:
        message += f": {body}"
    if status == 429 or status >= 500:
        raise TransientError(message, retry_after_s=retry_after_s(response))
    if status in (401, 403):
        hint = ("LIDC-IDRI is public and needs no token; if TCIA now requires one, download the "
                "collection with the NBIA Data Retriever and use data.source: local")
    elif status == 404:
        hint = ("Check data.tcia.base_url (e.g. https://services.cancerimagingarchive.net/nbia-api/"
                "services/v1) and that the series still exists on TCIA")
    else:
        hint = "Check data.tcia.base_url, data.tcia.collection, data.tcia.modality and data.tcia.patients"
    raise TciaError(f"{what}: {message}. {hint}")


def _stream_to_file(
    session: requests.Session,
    url: str,
    params: dict[str, str],
    path: Path,
    timeout_s: float,
    what: str,
    on_bytes: Callable[[int], Any] | None,
    expected_bytes: Callable[[int | None], int] = lambda declared: declared or FALLBACK_SERIES_BYTES,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
) -> None:
    """Stream a response body to ``path`` within its deadline (``timeout_s`` plus
    ``expected_bytes(Content-Length)`` at ``min_rate_kbps``)."""
    started = time.monotonic()
    with session.get(url, params=params, stream=True, timeout=timeout_s) as response:
        declared = declared_length(response)
        deadline = Deadline(started, timeout_s, min_rate_kbps, expected_bytes(declared), PARAMS_PREFIX)
        _raise_for_status(response, what, deadline)
        written = 0
        with open(path, "wb") as sink:
            for chunk in iter_body(response, deadline):
                sink.write(chunk)
                written += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        if declared is not None and written != declared:
            raise CorruptDownloadError(f"short download: {written} of {declared} bytes")


def _entry_target(dest_dir: Path, name: str, archive_path: Path) -> Path:
    normalized = name.replace("\\", "/")
    parts = PurePosixPath(normalized).parts
    unsafe = (
        normalized.startswith("/")
        or re.match(r"^[A-Za-z]:", normalized) is not None
        or ".." in parts
        or not [p for p in parts if p != "."]
    )
    target = dest_dir.joinpath(*[p for p in parts if p != "."]) if not unsafe else dest_dir
    if not unsafe:
        root = dest_dir.resolve()
        unsafe = not target.resolve().is_relative_to(root) or target.resolve() == root
    if unsafe:
        raise UnsafeZipEntryError(
            f"refusing zip entry {name!r} of {archive_path.name}: it would be written outside "
            f"its series folder; the archive is not a plain NBIA series download "
            "(check data.tcia.base_url)"
        )
    return target


def _read_md5_manifest(path: Path) -> dict[str, str]:
    """``md5hashes.csv`` as entry name -> lower-case MD5 (header names matched loosely)."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    if not rows:
        raise CorruptDownloadError(f"{MD5_MANIFEST_NAME} is empty")
    header = [h.strip().lower() for h in rows[0]]
    try:
        name_col, md5_col = header.index("filename"), header.index("md5hash")
    except ValueError as exc:
        raise CorruptDownloadError(
            f"{MD5_MANIFEST_NAME} has columns {rows[0]}, expected Filename and MD5Hash"
        ) from exc
    return {
        row[name_col].strip(): row[md5_col].strip().lower()
        for row in rows[1:]
        if len(row) > max(name_col, md5_col) and row[name_col].strip()
    }


def _report_unselected(raw_dir: Path, selected: list[TciaSeries]) -> None:
    """Warn about series folders on disk that this selection does not include."""
    lidc_dir = raw_dir / LIDC_DIRNAME
    wanted = {raw_dir / s.relative_dir for s in selected}
    others = [p for p in lidc_dir.glob("*/*/*") if p.is_dir() and p not in wanted]
    if others:
        LOG.warning(
            "%d series folder(s) under %s are not in this selection (e.g. %s); they are kept "
            "on disk but left out of the manifest", len(others), lidc_dir, others[0],
        )


def _parse_series_row(row: Any, url: str) -> TciaSeries:
    if not isinstance(row, dict):
        raise TciaError(f"getSeries at {url} returned an entry that is not an object: {row!r:.200}")
    values = {}
    for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(row.get(key) or "").strip()
        if not _SAFE_NAME.match(value) or value in (".", ".."):
            raise TciaError(
                f"getSeries at {url} returned {key}={row.get(key)!r}, which cannot be a folder name "
                f"(expected letters, digits, '.', '_' or '-'); entry: {row!r:.300}"
            )
        values[key] = value
    count = row.get("ImageCount")
    try:
        image_count = int(count) if count not in (None, "") else None
    except (TypeError, ValueError):
        image_count = None
    try:
        file_size = int(row.get("FileSize") or 0)  # only sizes the deadline
    except (TypeError, ValueError):
        file_size = 0
    if image_count is None:
        LOG.warning("getSeries at %s gives no usable ImageCount (%r) for series %s; its download "
                    "is verified without the image count", url, count, values["SeriesInstanceUID"])
    return TciaSeries(
        patient_id=values["PatientID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        image_count=image_count,
        file_size=file_size if file_size > 0 else None,
    )
