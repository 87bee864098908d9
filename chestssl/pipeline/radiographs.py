"""Stage ``radiographs``: the radiographs folder, rendered from the processed CT or read from a chest X-ray dataset.

With ``data.cxr.source: rendered`` (the default), a two-view study of digitally
reconstructed radiographs per processed CT (:func:`chestssl.data.drr.render_radiographs`);
otherwise the real dataset ``data.cxr`` names, in the same layout
(:func:`chestssl.data.cxr_import.import_radiographs`). Either way the folder of
:mod:`chestssl.data.radiograph_folder`, with images of ``radiographs.side`` pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from chestssl import paths

if TYPE_CHECKING:
    import pandas as pd


def radiographs(params: Mapping[str, Any], processed_dir: str | Path = paths.PROCESSED_DIR,
                radiographs_dir: str | Path = paths.RADIOGRAPHS_DIR, progress: bool = True) -> "pd.DataFrame":
    """Write the radiographs folder ``radiographs_dir``; returns its studies table.

    Args:
        params: the loaded params (``data.cxr``, ``radiographs``, ``preprocess.hu_window``).
        processed_dir: ``data/processed`` (stage ``preprocess``), rendered when
            ``data.cxr.source`` is ``rendered``.
        radiographs_dir: ``data/radiographs``.
        progress: show a progress bar.
    """
    cxr = params["data"]["cxr"]
    if cxr["source"] == "rendered":
        from chestssl.data.drr import render_radiographs

        return render_radiographs(processed_dir, radiographs_dir, params["radiographs"],
                                  hu_window=params["preprocess"]["hu_window"], progress=progress)
    from chestssl.data.cxr_import import import_radiographs

    return import_radiographs(cxr, radiographs_dir, params["radiographs"]["side"], progress=progress)
