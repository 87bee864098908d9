"""The stage layer: one module per DVC stage, one function per module, named after the stage.

Each function takes the loaded params, the stage's entry name where the stage is a
``foreach`` template, and the paths it reads and writes (the stage scripts pass those of
:mod:`chestssl.paths`, the unit tests temporary ones); it validates what it reads, calls
the layers below (data, models, methods, tasks, train, eval, ablations) and writes the
stage's outputs. The scripts in ``stages/`` only map their command line to it.

- :func:`~chestssl.pipeline.download.download`: ``data/raw`` from ``data.source``;
- :func:`~chestssl.pipeline.preprocess.preprocess`: ``data/processed`` (volumes, tables, split);
- :func:`~chestssl.pipeline.radiographs.radiographs`: radiographs rendered from the CT, or
  imported from a chest X-ray dataset;
- :func:`~chestssl.pipeline.pretrain.pretrain`: a ``methods`` or ``multihead`` entry on CT
  slices or crops;
- :func:`~chestssl.pipeline.evaluate_pretrain.evaluate_pretrain`: its encoder's linear probe
  and reconstructions on the test split;
- :func:`~chestssl.pipeline.finetune.finetune` and
  :func:`~chestssl.pipeline.evaluate.evaluate`: a ``runs`` entry trained, then scored;
- :func:`~chestssl.pipeline.report.report`: the tables and figures;
- :func:`~chestssl.pipeline.pretrain_radiographs.pretrain_radiographs`: a ``methods``
  entry trained on single radiographs (seeds 001, 004);
- :func:`~chestssl.pipeline.pretrain_radiograph_studies.pretrain_radiograph_studies`:
  ``mae`` / ``diffmae`` trained on whole radiograph studies with the bottleneck CLS (seed 004);
- :func:`~chestssl.pipeline.align_radiographs.align_radiographs`: seed 002's STN
  alignment experiment;
- :func:`~chestssl.pipeline.pretrain_cross_modal.pretrain_cross_modal`: a DAE trained on CT
  slices and radiographs, so its cross-modal contrastive term acts (seed 003);
- :func:`~chestssl.pipeline.label_fraction.label_fraction` and
  :func:`~chestssl.pipeline.frozen_parts.frozen_parts`: seed 001's ablations on a run.

Nothing below this package imports it (see ``tests/test_layering.py``).
"""
