"""The tcia source against a fake NBIA server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zipfile
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pydicom
import pytest
from dicom_factory import series_dicom_bytes, zip_bytes

from chestssl.data.manifest import read_manifest, series_checksum
from chestssl.data.tcia import (
    PARTIAL_DIRNAME,
    VERIFIED_MARKER,
    CorruptDownloadError,
    TciaError,
    TciaSeries,
    UnsafeZipEntryError,
    download_tcia,
    safe_extract,
)

COLLECTION = "LIDC-IDRI"
PATIENTS = ["LIDC-IDRI-0003", "LIDC-IDRI-0001", "LIDC-IDRI-0002"]
# The ``drip`` fault: 160 B/s (about 1.3 kbps), a byte well within any timeout_s
DRIP_BYTES, DRIP_EVERY_S = 16, 0.1


def _uids(patient: str) -> tuple[str, str]:
    number = int(patient.rsplit("-", 1)[1])
    return f"1.2.826.0.1.3680043.8.498.{number}.1", f"1.2.826.0.1.3680043.8.498.{number}.2"


def _md5_csv(files: dict[str, bytes]) -> bytes:
    lines = ["Filename,MD5Hash"] + [f"{n},{hashlib.md5(c).hexdigest()}" for n, c in files.items()]
    return ("\n".join(lines) + "\n").encode()


class FakeNbia:
    """getSeries and getImageWithMD5Hash for three CT patients and one radiograph series.

    ``faults[series_uid]`` is a queue of misbehaviours for that series' next downloads:
    ``truncate`` (closes the connection half-way), ``corrupt`` (bytes that are no zip),
    ``bad_md5``, ``evil`` (an entry ``../evil.dcm``), ``slow`` (answers after 1 s),
    ``drip`` (sends the archive 16 bytes every 0.1 s: never idle, never done in time),
    or an HTTP status such as ``500``, ``429``, ``404``. ``faults["getSeries"]`` does the
    same for the series list (``drip`` only).
    """

    def __init__(self, slices: int = 3):
        self.rows: list[dict] = []
        self.files: dict[str, dict[str, bytes]] = {}
        for patient in PATIENTS:
            study, series = _uids(patient)
            self.rows.append({
                "PatientID": patient, "StudyInstanceUID": study, "SeriesInstanceUID": series,
                "Modality": "CT", "Collection": COLLECTION, "ImageCount": slices, "FileSize": 1,
            })
            self.files[series] = series_dicom_bytes(patient, study, series, slices)
        self.rows.append({
            "PatientID": "LIDC-IDRI-0001", "StudyInstanceUID": "1.2.3.9", "SeriesInstanceUID": "1.2.3.9.1",
            "Modality": "DX", "Collection": COLLECTION, "ImageCount": 1,
        })
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.image_requests: list[str] = []
        self.series_requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/nbia-api/services/v1"

    def series_uid(self, patient: str) -> str:
        return _uids(patient)[1]

    def archive(self, series_uid: str, fault: str | None) -> bytes:
        files = dict(self.files[series_uid])
        manifest = _md5_csv(files)
        if fault == "bad_md5":
            first = next(iter(files))
            files[first] = files[first][:-1] + b"\x01"
        if fault == "evil":
            files["../evil.dcm"] = b"not yours"
        return zip_bytes({**files, "md5hashes.csv": manifest})

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                return

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(body)

            def _drip(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for start in range(0, len(body), DRIP_BYTES):
                        self.wfile.write(body[start:start + DRIP_BYTES])
                        self.wfile.flush()
                        time.sleep(DRIP_EVERY_S)
                except OSError:  # the client gave up
                    pass
                self.close_connection = True

            def do_GET(self):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                prefix, _, endpoint = url.path.rpartition("/")
                if prefix != "/nbia-api/services/v1":
                    endpoint = ""  # answered 404 below
                if endpoint == "getSeries":
                    with fake.lock:
                        fake.series_requests.append(query)
                    rows = [
                        r for r in fake.rows
                        if all(r.get(k) == query[k] for k in ("Collection", "Modality", "PatientID") if k in query)
                    ]
                    with fake.lock:
                        fault = fake.faults["getSeries"].pop(0) if fake.faults["getSeries"] else None
                    body = json.dumps(rows).encode() if rows else b""
                    if fault == "drip":
                        self._drip(body, "application/json")
                        return
                    self._send(200, body, "application/json")
                elif endpoint == "getImageWithMD5Hash":
                    uid = query["SeriesInstanceUID"]
                    with fake.lock:
                        fake.image_requests.append(uid)
                        fault = fake.faults[uid].pop(0) if fake.faults[uid] else None
                    if fault and fault.isdigit():
                        self._send(int(fault), b"server says no", "text/plain")
                        return
                    if fault == "slow":
                        time.sleep(1.0)
                    body = b"PK\x03\x04 this is not a zip archive" * 20 if fault == "corrupt" else fake.archive(uid, fault)
                    if fault == "drip":
                        self._drip(body, "application/octet-stream")
                        return
                    if fault == "truncate":
                        self.send_response(200)
                        self.send_header("Content-Type", "application/octet-stream")
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self._send(200, body, "application/octet-stream")
                else:
                    self._send(404, b"no such endpoint", "text/plain")

        return Handler

    def __enter__(self) -> "FakeNbia":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nbia():
    with FakeNbia() as server:
        yield server


def _download(raw_dir: Path, server: FakeNbia, **overrides):
    args = dict(
        base_url=server.base_url, collection=COLLECTION, modality="CT", patients=[], max_patients=0,
        retries=2, backoff_s=0.001, timeout_s=5.0, min_rate_kbps=256.0, progress=False,
    )
    args.update(overrides)
    return download_tcia(raw_dir, **args)


def _series_dir(raw_dir: Path, patient: str) -> Path:
    study, series = _uids(patient)
    return raw_dir / "LIDC-IDRI" / patient / study / series


def test_downloads_all_ct_series_into_pylidc_layout(tmp_path, nbia):
    records = _download(tmp_path, nbia)

    assert [r.patient_id for r in records] == sorted(PATIENTS)  # the DX series is not CT
    manifest = read_manifest(tmp_path / "manifest.csv")
    assert list(manifest["patient_id"]) == sorted(PATIENTS)
    assert set(manifest["source"]) == {"tcia"}
    for patient in PATIENTS:
        folder = _series_dir(tmp_path, patient)
        dicoms = sorted(folder.glob("*.dcm"))
        assert [p.name for p in dicoms] == ["00000001.dcm", "00000002.dcm", "00000003.dcm"]
        header = pydicom.dcmread(dicoms[0], stop_before_pixels=True)
        assert header.PatientID == patient and header.SeriesInstanceUID == folder.name
        row = manifest[manifest["patient_id"] == patient].iloc[0]
        assert row["images"] == 3
        assert row["checksum"] == series_checksum(folder)
        marker = json.loads((folder / VERIFIED_MARKER).read_text())
        assert marker["md5_verified"] is True and marker["checksum"] == row["checksum"]
    assert not (tmp_path / PARTIAL_DIRNAME).exists()


def test_subset_by_patient_list(tmp_path, nbia):
    records = _download(tmp_path, nbia, patients=["LIDC-IDRI-0002"], max_patients=1)

    assert [r.patient_id for r in records] == ["LIDC-IDRI-0002"]
    assert [q.get("PatientID") for q in nbia.series_requests] == ["LIDC-IDRI-0002"]
    assert nbia.image_requests == [nbia.series_uid("LIDC-IDRI-0002")]
    assert list(read_manifest(tmp_path / "manifest.csv")["patient_id"]) == ["LIDC-IDRI-0002"]


def test_subset_by_max_patients_takes_first_ids(tmp_path, nbia):
    records = _download(tmp_path, nbia, max_patients=2)

    assert [r.patient_id for r in records] == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    assert not (tmp_path / "LIDC-IDRI" / "LIDC-IDRI-0003").exists()


def test_unknown_patient_is_an_error_naming_it(tmp_path, nbia):
    with pytest.raises(TciaError, match="LIDC-IDRI-9999.*data.tcia.patients"):
        _download(tmp_path, nbia, patients=["LIDC-IDRI-0001", "LIDC-IDRI-9999"])


def test_interrupted_download_is_retried(tmp_path, nbia):
    uid = nbia.series_uid("LIDC-IDRI-0001")
    nbia.faults[uid] = ["truncate"]

    records = _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"])

    assert nbia.image_requests == [uid, uid]
    assert records[0].images == 3
    assert records[0].checksum == series_checksum(_series_dir(tmp_path, "LIDC-IDRI-0001"))


def test_server_errors_rate_limits_and_timeouts_are_retried(tmp_path, nbia):
    uid = nbia.series_uid("LIDC-IDRI-0001")
    nbia.faults[uid] = ["500", "429", "slow"]

    records = _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"], retries=3, timeout_s=0.3)

    assert nbia.image_requests == [uid] * 4
    assert records[0].images == 3


def test_a_series_dripping_below_the_minimum_rate_is_retried_then_fails_naming_series_and_rate(tmp_path, nbia):
    # The archive (about 1.5 kB) would take about 10 s at the drip rate; at 16 kbps
    # (2 kB/s) its deadline is timeout_s + size / rate, about 1.3 s.
    uid = nbia.series_uid("LIDC-IDRI-0001")
    nbia.faults[uid] = ["drip", "drip"]

    started = time.monotonic()
    with pytest.raises(TciaError) as error:
        _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"], retries=1, timeout_s=0.5, min_rate_kbps=16.0)

    assert time.monotonic() - started < 8.0  # two deadlines, not two whole drips
    message = str(error.value)
    assert f"series {uid}" in message and "2 attempt(s)" in message
    assert "too slow" in message and "16 kbps" in message and "data.tcia.min_rate_kbps" in message
    assert "\n" not in message
    assert nbia.image_requests == [uid, uid]
    assert not _series_dir(tmp_path, "LIDC-IDRI-0001").exists()
    assert not (tmp_path / "manifest.csv").exists()


def test_a_slow_series_is_retried_and_the_retry_succeeds(tmp_path, nbia):
    uid = nbia.series_uid("LIDC-IDRI-0001")
    nbia.faults[uid] = ["drip"]

    records = _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"], retries=1, timeout_s=0.5, min_rate_kbps=16.0)

    assert nbia.image_requests == [uid, uid] and records[0].images == 3


def test_a_dripping_series_list_is_retried_then_fails_naming_the_rate(tmp_path, nbia):
    nbia.faults["getSeries"] = ["drip", "drip"]

    with pytest.raises(TciaError, match=r"listing CT series.*2 attempt\(s\).*too slow.*16 kbps.*data\.tcia\.min_rate_kbps"):
        _download(tmp_path, nbia, retries=1, timeout_s=0.3, min_rate_kbps=16.0)
    assert nbia.image_requests == []


def test_series_deadline_grows_with_the_expected_size_and_has_fallbacks():
    from chestssl.data.tcia import FALLBACK_SERIES_BYTES, IMAGE_BYTES_ESTIMATE, expected_series_bytes
    from chestssl.data.transfer import transfer_deadline_s

    sized = TciaSeries("LIDC-IDRI-0001", "1.2", "1.2.3", 100, file_size=50_000_000)
    counted = TciaSeries("LIDC-IDRI-0001", "1.2", "1.2.3", 100)
    unknown = TciaSeries("LIDC-IDRI-0001", "1.2", "1.2.3", None)
    assert expected_series_bytes(sized, content_length=None) == 50_000_000
    assert expected_series_bytes(sized, content_length=60_000_000) == 60_000_000  # the larger of the two
    assert expected_series_bytes(counted, content_length=None) == 100 * IMAGE_BYTES_ESTIMATE
    assert expected_series_bytes(unknown, content_length=None) == FALLBACK_SERIES_BYTES
    # 50 MB at 1000 kbps (125 kB/s) is 400 s, plus the base allowance
    assert transfer_deadline_s(50_000_000, min_rate_kbps=1000.0, base_s=120.0) == pytest.approx(520.0)
    assert transfer_deadline_s(50_000_000, min_rate_kbps=0.0, base_s=120.0) is None  # 0: no deadline


def test_getseries_file_size_is_read(tmp_path, nbia):
    from chestssl.data.tcia import list_series
    import requests

    nbia.rows[1]["FileSize"] = 1234567
    with requests.Session() as session:
        series = list_series(session, nbia.base_url, COLLECTION, "CT", ["LIDC-IDRI-0001"])
    assert series[0].file_size == 1234567


@pytest.mark.parametrize("base_url", ["", "services.cancerimagingarchive.net/nbia-api/services/v1",
                                      "ftp://example.org/nbia", "http:///nbia"])
def test_a_malformed_base_url_is_a_one_line_user_error_naming_it(tmp_path, base_url):
    from chestssl.errors import UserError

    with pytest.raises(UserError) as error:
        download_tcia(tmp_path, base_url, COLLECTION, "CT", [], 1, 0, 0.0, 1.0, progress=False)
    message = str(error.value)
    assert "data.tcia.base_url" in message and repr(base_url) in message and "http" in message
    assert "\n" not in message


def test_client_error_is_not_retried_and_names_status_and_url(tmp_path, nbia):
    uid = nbia.series_uid("LIDC-IDRI-0001")
    nbia.faults[uid] = ["404"]

    with pytest.raises(TciaError, match=r"getImageWithMD5Hash.*HTTP 404.*data.tcia.base_url"):
        _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"])
    assert nbia.image_requests == [uid]


def test_corrupt_zip_is_retried_then_fails_clearly_leaving_no_series(tmp_path, nbia):
    uid = nbia.series_uid("LIDC-IDRI-0001")
    nbia.faults[uid] = ["corrupt"] * 3

    with pytest.raises(TciaError) as error:
        _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"], retries=2)

    message = str(error.value)
    assert f"series {uid}" in message and "3 attempt(s)" in message and "not a valid zip" in message
    assert "data.tcia.retries" in message
    assert nbia.image_requests == [uid] * 3
    assert not _series_dir(tmp_path, "LIDC-IDRI-0001").exists()
    assert not list((tmp_path / PARTIAL_DIRNAME).rglob("*"))
    assert not (tmp_path / "manifest.csv").exists()


def test_corrupt_zip_once_then_good_succeeds(tmp_path, nbia):
    uid = nbia.series_uid("LIDC-IDRI-0002")
    nbia.faults[uid] = ["corrupt"]

    records = _download(tmp_path, nbia, patients=["LIDC-IDRI-0002"])

    assert nbia.image_requests == [uid, uid] and records[0].images == 3


def test_md5_mismatch_is_detected(tmp_path, nbia):
    uid = nbia.series_uid("LIDC-IDRI-0001")
    nbia.faults[uid] = ["bad_md5"] * 2

    with pytest.raises(TciaError, match="MD5 mismatch: 00000001.dcm"):
        _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"], retries=1)
    assert not _series_dir(tmp_path, "LIDC-IDRI-0001").exists()


def test_image_count_mismatch_is_detected(tmp_path, nbia):
    nbia.rows[1]["ImageCount"] = 4  # LIDC-IDRI-0001 lists one slice more than it serves

    with pytest.raises(TciaError, match="holds 3 DICOM files, but TCIA lists ImageCount 4"):
        _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"], retries=0)


def test_zip_entry_outside_series_folder_is_refused(tmp_path, nbia):
    uid = nbia.series_uid("LIDC-IDRI-0001")
    nbia.faults[uid] = ["evil"]

    with pytest.raises(UnsafeZipEntryError, match=r"'\.\./evil\.dcm'"):
        _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"])
    assert nbia.image_requests == [uid]  # not a transient fault: no retry
    assert not list(tmp_path.rglob("evil.dcm"))
    assert not _series_dir(tmp_path, "LIDC-IDRI-0001").exists()


@pytest.mark.parametrize("name", ["../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm", "C:\\evil.dcm", "..\\evil.dcm"])
def test_safe_extract_refuses_escaping_entries(tmp_path, name):
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_bytes({"00000001.dcm": b"ok", name: b"bad"}))
    dest = tmp_path / "dest"
    dest.mkdir()

    with pytest.raises(UnsafeZipEntryError, match="evil.dcm"):
        safe_extract(archive, dest)
    assert not list(dest.iterdir())  # nothing is written before every entry is checked


def test_safe_extract_detects_a_bad_crc(tmp_path):
    content = b"slice" * 200
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        z.writestr("00000001.dcm", content)
    data = archive.read_bytes()
    archive.write_bytes(data.replace(content, content[:-1] + b"X"))

    with pytest.raises(CorruptDownloadError, match="00000001.dcm"):
        safe_extract(archive, tmp_path / "dest")


def test_second_run_skips_verified_series(tmp_path, nbia):
    first = _download(tmp_path, nbia)
    requests_after_first = list(nbia.image_requests)

    second = _download(tmp_path, nbia)

    assert nbia.image_requests == requests_after_first
    assert second == first


def test_partial_series_folder_is_downloaded_again(tmp_path, nbia):
    _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"])
    folder = _series_dir(tmp_path, "LIDC-IDRI-0001")
    # an interrupted earlier run: one file missing and no marker, plus a stray partial zip
    (folder / "00000003.dcm").unlink()
    (folder / VERIFIED_MARKER).unlink()
    (tmp_path / PARTIAL_DIRNAME).mkdir()
    (tmp_path / PARTIAL_DIRNAME / "x.zip.part").write_bytes(b"half")
    nbia.image_requests.clear()

    records = _download(tmp_path, nbia, patients=["LIDC-IDRI-0001"])

    assert nbia.image_requests == [nbia.series_uid("LIDC-IDRI-0001")]
    assert len(list(folder.glob("*.dcm"))) == 3 and (folder / VERIFIED_MARKER).is_file()
    assert records[0].checksum == series_checksum(folder)
    assert not (tmp_path / PARTIAL_DIRNAME).exists()


def test_series_with_file_count_different_from_marker_is_redone(tmp_path, nbia):
    _download(tmp_path, nbia, patients=["LIDC-IDRI-0002"])
    folder = _series_dir(tmp_path, "LIDC-IDRI-0002")
    (folder / "00000002.dcm").unlink()  # marker present, a file lost
    nbia.image_requests.clear()

    _download(tmp_path, nbia, patients=["LIDC-IDRI-0002"])

    assert nbia.image_requests == [nbia.series_uid("LIDC-IDRI-0002")]
    assert len(list(folder.glob("*.dcm"))) == 3


def test_a_link_at_the_series_place_is_replaced_without_touching_its_target(tmp_path, nbia):
    elsewhere = tmp_path / "user_copy"
    elsewhere.mkdir()
    (elsewhere / "keep.dcm").write_bytes(b"user data")
    folder = _series_dir(tmp_path / "raw", "LIDC-IDRI-0001")
    folder.parent.mkdir(parents=True)
    folder.symlink_to(elsewhere, target_is_directory=True)

    _download(tmp_path / "raw", nbia, patients=["LIDC-IDRI-0001"])

    assert not folder.is_symlink() and len(list(folder.glob("*.dcm"))) == 3
    assert (elsewhere / "keep.dcm").read_bytes() == b"user data"


def test_unsafe_uid_from_server_is_refused(tmp_path, nbia):
    nbia.rows[0]["SeriesInstanceUID"] = "../../etc"

    with pytest.raises(TciaError, match="cannot be a folder name"):
        _download(tmp_path, nbia)


def test_tciaseries_layout():
    item = TciaSeries("LIDC-IDRI-0001", "1.2", "1.2.3", 3)
    assert item.relative_dir == Path("LIDC-IDRI", "LIDC-IDRI-0001", "1.2", "1.2.3")


def test_manifest_columns(tmp_path, nbia):
    _download(tmp_path, nbia, max_patients=1)
    frame = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    assert list(frame.columns) == [
        "patient_id", "study_instance_uid", "series_instance_uid", "images", "source", "checksum",
    ]


def test_wrong_base_url_names_status_and_url(tmp_path, nbia):
    with pytest.raises(TciaError, match=r"getSeries\?Collection=LIDC-IDRI.*HTTP 404.*data.tcia.base_url"):
        _download(tmp_path, nbia, base_url=nbia.base_url.replace("/v1", "/v9"))


def test_progress_bars_show_series_and_bytes(tmp_path, nbia, capsys):
    _download(tmp_path, nbia, max_patients=1, progress=True)
    err = capsys.readouterr().err
    assert "series" in err and "downloaded" in err and "B" in err
