"""Study-level MAE and diffusion MAE (seed 004's bottleneck CLS): the same losses as the
image-level methods for one-view studies, views informing each other only within a study,
a training loop over variable-size studies, and clear errors."""

from __future__ import annotations

import pytest
import torch

from chestssl.data.radiograph_datasets import collate_studies
from chestssl.methods import STUDY_LEVEL, build_method
from chestssl.methods.mae import DiffusionMaskedAutoencoderPretraining, MaskedAutoencoderPretraining
from chestssl.methods.study_mae import StudyDiffusionMaskedAutoencoder, StudyMaskedAutoencoder
from chestssl.train.loop import fit
from tests.tiny_configs import DIFFMAE, MAE

PAIRS = [
    (StudyMaskedAutoencoder, MaskedAutoencoderPretraining, MAE),
    (StudyDiffusionMaskedAutoencoder, DiffusionMaskedAutoencoderPretraining, DIFFMAE),
]
IDS = ["mae", "diffmae"]
#: Three studies of 2, 3 and 1 views, interleaved.
STUDIES = torch.tensor([0, 1, 0, 1, 2, 1])


def _views(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("study_cls,image_cls,cfg", PAIRS, ids=IDS)
def test_one_view_studies_give_the_image_level_losses_exactly(study_cls, image_cls, cfg):
    views = _views(4)
    study, image = study_cls("m", cfg, seed=3), image_cls("m", cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(study.state_dict().values(), image.state_dict().values()))
    batch = {"images": views, "study_index": torch.arange(4)}
    assert torch.equal(study.training_step(batch)["loss"], image.training_step({"image": views})["loss"])
    study.eval(), image.eval()
    assert torch.equal(study.validation_step(batch)["loss"], image.validation_step({"image": views})["loss"])


@pytest.mark.parametrize("study_cls,image_cls,cfg", PAIRS, ids=IDS)
def test_shared_studies_change_the_loss(study_cls, image_cls, cfg):
    views = _views(6)
    study, image = study_cls("m", cfg, seed=3), image_cls("m", cfg, seed=3)
    shared = study.training_step({"images": views, "study_index": STUDIES})["loss"]
    assert not torch.equal(shared, image.training_step({"image": views})["loss"])


def test_a_views_reconstruction_depends_on_its_own_study_only():
    method = StudyMaskedAutoencoder("m", MAE, seed=0)
    views = _views(6).requires_grad_(True)
    mask = method.draw_mask(6, torch.Generator().manual_seed(1), views.device)
    with method._studies({"images": views, "study_index": STUDIES}) as batch:
        prediction = method.predict_all(batch["image"], mask)
    # View 0 is in study 0 with view 2; views 1, 3 (study 1) and 4 (study 2) are elsewhere.
    (gradient,) = torch.autograd.grad(prediction[0].sum(), views)
    per_view = gradient.abs().flatten(1).sum(1)
    assert per_view[0] > 0 and per_view[2] > 0
    assert torch.all(per_view[[1, 3, 4, 5]] == 0)


def test_outside_a_study_batch_views_are_encoded_alone():
    method = StudyMaskedAutoencoder("m", MAE, seed=0)
    views = _views(3)
    visible = method.draw_mask(3, torch.Generator().manual_seed(1), views.device).visible
    assert torch.equal(method.encode_visible(views, visible), method.vit.encode_visible(views, visible))
    with method._studies({"images": views, "study_index": torch.tensor([0, 0, 1])}):
        assert not torch.equal(method.encode_visible(views, visible), method.vit.encode_visible(views, visible))
    assert method._study_index is None


class _Studies(torch.utils.data.Dataset):
    """Studies of 1 to 3 views, each a dict as RadiographStudyDataset's."""

    def __init__(self, count: int):
        self.items = [{"images": _views(1 + index % 3, seed=index), "label": index % 2} for index in range(count)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@pytest.mark.parametrize("cfg", [MAE, DIFFMAE], ids=IDS)
def test_the_training_loop_trains_on_batches_of_variable_size_studies(cfg, tmp_path):
    method = build_method("m", cfg, seed=0, level="study")
    train = dict(epochs=2, batch_size=3, lr=1e-3, weight_decay=0.0, optimizer="adamw", betas=[0.9, 0.999],
                 scheduler="none", grad_clip=1.0, max_steps=0, amp=False, num_workers=0, log_every=1, device="cpu")
    before = {key: value.clone() for key, value in method.state_dict().items()}
    result = fit(method, _Studies(6), _Studies(3), train, tmp_path / "live", tmp_path / "ckpt.pt", seed=0,
                 collate_fn=collate_studies)
    assert result.steps == 4 and torch.isfinite(torch.tensor(result.final_metrics["val/loss"]))
    assert any(not torch.equal(before[key], value) for key, value in result.best_state.items() if key.startswith("vit."))


def test_the_study_forms_are_built_from_the_same_entries_and_only_masked_patch_methods_have_one():
    assert set(STUDY_LEVEL) == {"mae", "diffmae"}
    for study_cls, image_cls, cfg in PAIRS:
        built = build_method("m", cfg, seed=0, level="study")
        assert type(built) is study_cls and isinstance(built, image_cls)
        assert type(build_method("m", cfg, seed=0)) is image_cls
    with pytest.raises(ValueError, match=r"bt: method 'barlow_twins' has no study-level form \(bottleneck CLS\); "
                                          r"those that have one: 'mae', 'diffmae'"):
        build_method("bt", {"method": "barlow_twins"}, seed=0, level="study")
    with pytest.raises(ValueError, match="level: got 'slice'"):
        build_method("m", MAE, seed=0, level="slice")


def test_a_batch_without_study_numbers_names_what_is_missing():
    method = StudyMaskedAutoencoder("m", MAE, seed=0)
    with pytest.raises(ValueError, match="lacks study_index.*collate_radiograph_studies"):
        method.training_step({"images": _views(2)})
