"""Pointing pylidc at an LIDC-IDRI folder.

pylidc finds DICOM files through the ``[dicom] path`` option of its configuration file,
which it looks for in the user's home (``~/.pylidcrc``) and, if missing, *creates* there.
:func:`use_dicom_root` writes that configuration file in a folder of our choosing and
makes pylidc read it from there, so the pipeline never reads or writes the user's home.
"""

from __future__ import annotations

import configparser
import os
import sys
import warnings
from pathlib import Path
from typing import Any

LIDC_DIRNAME = "LIDC-IDRI"


def import_pylidc():
    """Import pylidc quietly (it imports the deprecated ``pkg_resources``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pylidc

    return pylidc


def use_dicom_root(dicom_root: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> Path:
    """Make pylidc load DICOM series from ``dicom_root`` (the ``LIDC-IDRI`` folder).

    The configuration file is written to ``config_dir`` (default: ``dicom_root``'s
    parent) and pylidc's config lookup is redirected to it. Returns the config path.
    """
    dicom_root = Path(dicom_root).resolve()
    if not dicom_root.is_dir():
        raise FileNotFoundError(
            f"LIDC-IDRI folder {dicom_root} does not exist; run the download stage "
            "(dvc repro download) or set data.local.path to your copy"
        )
    config_dir = Path(config_dir).resolve() if config_dir else dicom_root.parent
    config_dir.mkdir(parents=True, exist_ok=True)
    pylidc = import_pylidc()
    scan_module = sys.modules[pylidc.Scan.__module__]
    config_file = config_dir / scan_module._get_config_filename()
    parser = configparser.ConfigParser()
    parser["dicom"] = {"path": str(dicom_root), "warn": "True"}
    with open(config_file, "w") as f:
        parser.write(f)
    scan_module._get_config_path = lambda: str(config_dir)
    return config_file


def cluster_annotations(scan) -> list[list]:
    """pylidc's ``scan.cluster_annotations()``: the same clusters, in the same order, quicker.

    pylidc loads an annotation's contours lazily, one SQLite query each, and its database
    has no index on them, so each query reads the whole contour table (about 12 ms); its
    default metric (``min``: the least distance between two annotations' contour points)
    also rebuilds both annotations' contour points for every pair. Here the scan's
    contours come in one query and each annotation's points are built once; the contours
    stay loaded for what reads them next (consensus masks).
    """
    from scipy.spatial.distance import cdist
    from sqlalchemy.orm import selectinload

    pl = import_pylidc()
    # Held until the scan has loaded its own list: the session maps rows to these objects
    # only while they live, and the scan's list then keeps them (contours included).
    annotations = pl.query(pl.Annotation).filter(pl.Annotation.scan_id == scan.id).options(
        selectinload(pl.Annotation.contours)).all()
    points: dict[int, Any] = {}

    def contour_points(annotation):
        if annotation.id not in points:
            points[annotation.id] = annotation.contours_matrix
        return points[annotation.id]

    def least_distance(first, second) -> float:
        return float(cdist(contour_points(first), contour_points(second)).min())

    clusters = scan.cluster_annotations(metric=least_distance, verbose=False)
    del annotations
    return clusters
