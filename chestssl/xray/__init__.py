"""Chest radiographs (seeds 001, 002, 004): models and stages that learn from them.

- :mod:`chestssl.xray.pretrain`: ``methods`` entries trained on the radiographs rendered
  from CT (stage ``pretrain_radiographs@<method>``);
- :mod:`chestssl.xray.stn` and :mod:`chestssl.xray.alignment`: seed 002's spatial
  transformer and its alignment study (stage ``align_radiographs``);
- :mod:`chestssl.xray.study_vit`: seed 004's study-level ViT encoding with a bottleneck
  CLS token shared by the views of a study;
- :mod:`chestssl.xray.study_mae` and :mod:`chestssl.xray.study_probe`: MAE and diffusion
  MAE trained on whole studies through that encoding, and the study-level linear probe
  (stage ``pretrain_radiograph_studies@<method>``).

The radiographs themselves are rendered and read by :mod:`chestssl.data.drr`,
:mod:`chestssl.data.cxr` and :mod:`chestssl.data.radiograph_datasets`.
"""
