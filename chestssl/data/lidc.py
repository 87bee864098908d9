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
