"""Downstream ablations of seed 001 on any ``runs`` or ``radiograph_runs`` entry: label fraction and frozen parts.

- :mod:`chestssl.ablations.label_fraction`: the run fine-tuned again on nested shares of
  the training patients (stage ``label_fraction@<run>``);
- :mod:`chestssl.ablations.frozen_parts`: the run trained with the head only, then with
  more and more of the encoder's deepest stages (stage ``frozen_parts@<run>``);
- :mod:`chestssl.ablations.parts`: the named stages of every backbone and the partly
  frozen task model;
- :mod:`chestssl.ablations.runner`: training and testing of each setting, with resume;
- :mod:`chestssl.ablations.radiographs`: a radiograph fine-tuning run as the subject, and
  its label-fraction shares of the training images.

The stages themselves are :mod:`chestssl.pipeline.label_fraction`,
:mod:`chestssl.pipeline.frozen_parts` and :mod:`chestssl.pipeline.radiograph_ablations`.
"""
