"""Chest radiographs (seeds 001, 002, 004): models and stages that learn from them.

- :mod:`chestssl.xray.pretrain`: ``methods`` entries trained on the radiographs (rendered
  from CT or a real dataset; stage ``pretrain_radiographs@<method>``);
- :mod:`chestssl.xray.probe`: their linear probe on the folder's labels, per image or per
  study;
- :mod:`chestssl.xray.stn` and :mod:`chestssl.xray.alignment`: seed 002's spatial
  transformer and its alignment study (stage ``align_radiographs``);
- :mod:`chestssl.xray.study_vit`: seed 004's study-level ViT encoding with a bottleneck
  CLS token shared by the views of a study;
- :mod:`chestssl.xray.study_mae`: MAE and diffusion MAE trained on whole studies through
  that encoding (stage ``pretrain_radiograph_studies@<method>``).

The radiographs themselves are rendered by :mod:`chestssl.data.drr` or imported by
:mod:`chestssl.data.cxr_import` (readers in :mod:`chestssl.data.cxr`) into the layout of
:mod:`chestssl.data.radiograph_folder`, and read by :mod:`chestssl.data.radiograph_datasets`.
"""
