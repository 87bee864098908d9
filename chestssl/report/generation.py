"""Seed 000's generation table (FID of the latent diffusion models) and their samples beside real slices.

Seed 000 (its README, "Generation performance on different backbone") trained a DDPM on the
latents of each autoencoder and reported the FID of 1000 samples on Inception-v3 features.
FID depends on the feature network, the number of samples and the resolution, so the table
states ours for every row and never reads as a reproduction of the seed's numbers: ours are
another feature network, other counts, other data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns

from chestssl.report.figures import _image_axis, _new_figure, as_2d_images, save_figure
from chestssl.report.published import published
from chestssl.report.tables import Table, format_interval, with_costs

TABLE_NAME = "seed000_generation"
TITLE = "Seed 000: generation performance by backbone (FID, lower is better)"
#: The seed's protocol, from its README and code (DIGEST: Inception-v3 pool features, 2048).
SEED_PROTOCOL = "Inception-v3 features (2048), 1000 samples, 128x128 slices"
NOT_RUN = "not run"


def generation_table(
    rows: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, tuple[Mapping[str, Any], str] | None],
    dataset_note: str,
    costs: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> Table:
    """One row per ``report.seed000_generation`` row: the seed's FID and ours with its interval
    and protocol (feature network, samples against test slices, sampler, resolution).

    Args:
        rows: ``{seed_row, latent_diffusion: <entry or None>}`` in order.
        metrics: entry -> ``(parsed evaluate_latent_diffusion metrics.json, its path)``, or
            ``None`` where the stage has not written it.
        dataset_note: our data in a few words (quoted in the comparability footnote).
        costs: ``latent_diffusion@<entry>`` -> its ``cost.json`` (cost columns), or no columns.
    """
    seed_fid = {record.row: record.value for record in published().select(seed="000", table=TABLE_NAME, metric="fid")}
    footnotes = [
        f"Not comparable with the seed's numbers: FID depends on the feature network, the sample counts and the "
        f"resolution, and the data differ. Seed 000: {SEED_PROTOCOL}, LIDC-IDRI with a slice-level split; ours: "
        f"{dataset_note}, the protocol in each row.",
    ]
    numbers, text = [], []
    for row in rows:
        seed_row, entry = row["seed_row"], row.get("latent_diffusion")
        if seed_row not in seed_fid:
            raise KeyError(f"report.{TABLE_NAME}: seed_row {seed_row!r} is not a row of the seed's table "
                           f"({', '.join(seed_fid)})")
        found = metrics.get(entry) if entry else None
        number = {"experiment": seed_row, "entry": entry, "fid_seed000": float(seed_fid[seed_row]),
                  "available": found is not None}
        cells = {"Experiment": seed_row, "Entry (ours)": f"`{entry}`" if entry else NOT_RUN,
                 "FID, seed 000 [^1]": seed_fid[seed_row]}
        if found is None:
            cells.update({"FID (ours)": NOT_RUN, "Protocol (ours)": ""})
        else:
            result, source = found
            fid = result.get("fid")
            if not isinstance(fid, Mapping) or "value" not in fid:
                raise KeyError(f"{source}: no `fid` record; rerun evaluate_latent_diffusion@{entry}")
            number.update(fid=fid["value"], fid_ci_low=fid.get("ci_low"), fid_ci_high=fid.get("ci_high"),
                          n_generated=fid.get("n_generated"), n_real=fid.get("n_real"),
                          feature_network=result.get("feature_network"), sampler=result.get("sampler"),
                          sampling_steps=result.get("sampling_steps"), image_size=result.get("image_size"))
            size = result.get("image_size")
            cells["FID (ours)"] = format_interval(fid["value"], fid.get("ci_low"), fid.get("ci_high"), 2)
            cells["Protocol (ours)"] = (
                f"{result.get('feature_network')}; {fid.get('n_generated')} samples vs {fid.get('n_real')} test "
                f"slices of {result.get('n_patients')} patients; {result.get('sampler')}, "
                f"{result.get('sampling_steps')} steps; {size}x{size}")
        numbers.append(number)
        text.append(cells)
    columns = ["Experiment", "Entry (ours)", "FID (ours)", "FID, seed 000 [^1]", "Protocol (ours)"]
    table = Table(TABLE_NAME, TITLE, pd.DataFrame(numbers), pd.DataFrame(text, columns=columns), footnotes)
    if costs is None:
        return table
    keys = [f"latent_diffusion@{row['latent_diffusion']}" if row.get("latent_diffusion") else None for row in rows]
    return with_costs(table, costs, keys, note="The cost of each row's latent diffusion training "
                                               "(its autoencoder's is in the reconstruction table).")


def generation_figure(path: str | os.PathLike, samples: Mapping[str, Mapping[str, np.ndarray]],
                      columns: int = 8) -> Path:
    """Rows: real test slices (those of the first entry's file), then each entry's generated
    slices; ``samples``: label -> ``samples.npz`` arrays (``generated``, ``real``)."""
    if not samples:
        raise ValueError("no generated samples to plot")
    labels = list(samples)
    real = as_2d_images(samples[labels[0]]["real"], f"{labels[0]} real")
    n_columns = min(columns, len(real), *(len(samples[label]["generated"]) for label in labels))
    rows = [("real (test)", real[:n_columns])]
    rows += [(label, as_2d_images(samples[label]["generated"], f"{label} generated")[:n_columns]) for label in labels]
    with sns.axes_style("white"):
        figure = _new_figure(1.6 * n_columns, 1.7 * len(rows))
        axes = figure.subplots(len(rows), n_columns, squeeze=False)
        for row, (label, images) in enumerate(rows):
            for column in range(n_columns):
                ax = axes[row, column]
                ax.imshow(np.clip(images[column], 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                _image_axis(ax)
                if column == 0:
                    ax.set_ylabel(label, fontsize=9)
        figure.suptitle("Latent diffusion: generated slices beside real test slices")
    return save_figure(figure, path)
