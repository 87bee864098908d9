"""Tiny DICOM series for data-source tests: a few 8x8 slices with chosen UIDs."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def make_slice(
    patient_id: str,
    study_uid: str,
    series_uid: str,
    index: int,
    modality: str = "CT",
    size: int = 8,
) -> Dataset:
    """One ``size`` x ``size`` int16 slice at z = 2.5 * ``index`` mm."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE if modality == "CT" else DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, 2.5 * index]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 2.5
    ds.RescaleIntercept = -1024.0
    ds.RescaleSlope = 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.full((size, size), 10 * index, np.int16).tobytes()
    return ds


def write_series(
    folder: str | Path,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    num_slices: int = 3,
    modality: str = "CT",
    name_pattern: str = "{index:06d}.dcm",
) -> list[Path]:
    """Write ``num_slices`` slices into ``folder``; file names from ``name_pattern``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(num_slices):
        path = folder / name_pattern.format(index=index + 1)
        make_slice(patient_id, study_uid, series_uid, index, modality).save_as(
            path, enforce_file_format=True
        )
        paths.append(path)
    return paths


def series_dicom_bytes(
    patient_id: str, study_uid: str, series_uid: str, num_slices: int = 3
) -> dict[str, bytes]:
    """The encoded slices of a series by file name, as NBIA names them in a zip."""
    files = {}
    for index in range(num_slices):
        buffer = io.BytesIO()
        make_slice(patient_id, study_uid, series_uid, index).save_as(buffer, enforce_file_format=True)
        files[f"{index + 1:08d}.dcm"] = buffer.getvalue()
    return files


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    """A deflated zip archive holding ``entries`` (name -> content) in order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return buffer.getvalue()
