"""Stage ``frozen_parts@<run>``: the run trained with the head only, then with more of the encoder (seed 001).

Seed 001 fine-tunes its pretrained encoder with only the head trained, then with the
deepest stage too, and so on. :func:`frozen_parts` trains the run once per entry of
``frozen_parts.unfrozen_stages`` with only the head and that many of the encoder's deepest
stages trained (:mod:`chestssl.ablations.frozen_parts`,
:class:`~chestssl.ablations.parts.PartlyFrozenTask`), tests each
(:func:`chestssl.ablations.runner.run_ablation`) and writes one entry per setting,
naming the stages it trained, to ``metrics.json``, and what each setting's training cost
to ``cost.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from chestssl.io import write_json
from chestssl.params import ParamsError

#: The stage, and the ``params`` block that lists its runs.
STAGE = "frozen_parts"


def frozen_parts(
    params: Mapping[str, Any],
    name: str,
    processed_dir: str | Path,
    model_path: str | Path,
    report_dir: str | Path,
    state_dir: str | Path,
) -> dict[str, Any] | None:
    """Train ``runs.<name>`` with its head and the N deepest encoder stages, for each N, and test it.

    Args:
        params: the loaded params (``frozen_parts``, ``runs``, ``seed``, ``slices``,
            ``evaluate``).
        name: a run listed in ``frozen_parts.runs`` (a classification run).
        processed_dir: ``data/processed``.
        model_path: the run's ``models/finetune/<run>/model.pt`` (its pretrained encoder).
        report_dir: receives ``metrics.json``, ``live/<setting>/`` (curves) and ``cost.json``:
            ``{"fits": {<setting>: <cost>}}``, what each setting's training cost
            (:func:`~chestssl.train.cost_probe.fit_cost`), keyed as ``settings`` in ``metrics.json``.
        state_dir: finished settings and the resume checkpoint, removed once the metrics
            are written.

    Returns the metrics, or ``None`` on a non-main process under ``torchrun``.
    """
    from chestssl.ablations.frozen_parts import frozen_parts_metrics, frozen_parts_settings
    from chestssl.ablations.runner import ablation_costs, finish_ablation, run_ablation, run_encoder_payload
    from chestssl.models.backbones import load_encoder

    block = params[STAGE]
    if name not in block["runs"]:
        raise ParamsError([f"{STAGE}.runs: {name!r} is not listed ({', '.join(block['runs']) or 'empty'})"])
    run = params["runs"][name]
    report_dir = Path(report_dir)
    payload = run_encoder_payload(model_path, name)
    encoder = load_encoder(payload, source=f"{model_path} (encoder)")
    try:
        settings = frozen_parts_settings(encoder, block["unfrozen_stages"], name)
    except ValueError as exc:  # the counts a backbone allows are known only once its encoder is built
        raise ParamsError([f"{STAGE}.unfrozen_stages: {exc}"]) from exc
    results = run_ablation(STAGE, name, params, payload, settings, processed_dir=processed_dir,
                           model_path=model_path, report_dir=report_dir, state_dir=state_dir)
    if not results:  # under torchrun, rank 0 writes the outputs
        return None
    metrics = frozen_parts_metrics(name, run, encoder, results)
    write_json(report_dir / "cost.json", ablation_costs(results))
    write_json(report_dir / "metrics.json", metrics)
    finish_ablation(state_dir)
    return metrics
