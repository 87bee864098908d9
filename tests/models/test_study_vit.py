"""Study-level ViT with a bottleneck CLS (seed 004): mixing only within a study, the shared CLS,
equality with the plain encoder for one-view studies, study features, gradients, collation."""

from __future__ import annotations

import pytest
import torch

from chestssl.data.radiograph_datasets import collate_studies
from chestssl.models.seeding import seeded
from chestssl.models.study_vit import (
    encode_study,
    encode_study_visible,
    first_view_of_study,
    study_mean_cls,
    study_representation,
    views_per_study,
)
from chestssl.models.vit import ViTEncoder, build_vit_encoder

TINY_VIT = {
    "name": "vit",
    "spatial_dims": 2,
    "img_size": 32,
    "patch_size": 8,
    "hidden_size": 16,
    "num_layers": 2,
    "num_heads": 2,
    "mlp_dim": 32,
}
#: Three studies of 3, 2 and 1 views, interleaved in the batch.
INTERLEAVED = torch.tensor([0, 1, 0, 2, 1, 0])


def _encoder(seed: int = 0) -> ViTEncoder:
    with seeded(seed):
        return build_vit_encoder(TINY_VIT).eval()


def _views(count: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 1, 32, 32, generator=torch.Generator().manual_seed(seed))


def _visible(count: int, keep: int = 7, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(16, generator=generator)[:keep] for _ in range(count)])


def _encode_all(encoder: ViTEncoder, x: torch.Tensor, study_index: torch.Tensor) -> torch.Tensor:
    return encode_study(encoder, x, study_index)[0]


def _encode_masked(encoder: ViTEncoder, x: torch.Tensor, study_index: torch.Tensor) -> torch.Tensor:
    return encode_study_visible(encoder, x, _visible(x.shape[0]), study_index)


def test_study_mean_cls_matches_a_per_study_average_and_keeps_patch_tokens():
    tokens = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0))
    mixed = study_mean_cls(tokens, INTERLEAVED)
    for study in range(3):
        members = INTERLEAVED == study
        expected = tokens[members, 0].mean(dim=0)
        torch.testing.assert_close(mixed[members, 0], expected.expand(int(members.sum()), -1))
    assert torch.equal(mixed[:, 1:], tokens[:, 1:])
    assert torch.equal(study_mean_cls(tokens, torch.arange(6)), tokens)


def test_study_mean_cls_gradient_matches_finite_differences():
    tokens = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: study_mean_cls(t, INTERLEAVED), (tokens,))


@pytest.mark.parametrize("encode", [_encode_all, _encode_masked], ids=["encode_study", "encode_study_visible"])
def test_changing_one_view_changes_only_its_own_study(encode):
    encoder = _encoder()
    x = _views(6)
    changed = x.clone()
    changed[2] = 1.0 - changed[2]  # a view of study 0
    with torch.no_grad():
        before, after = encode(encoder, x, INTERLEAVED), encode(encoder, changed, INTERLEAVED)
    for position, study in enumerate(INTERLEAVED.tolist()):
        if study == 0:
            # every view of the study sees the change through the shared CLS, in all its tokens
            assert not torch.isclose(before[position], after[position]).all(dim=-1).any()
        else:
            assert torch.equal(before[position], after[position])


def test_cls_tokens_of_a_study_are_its_mean_after_every_layer():
    encoder = _encoder()
    x = _views(6)
    block_outputs: list[torch.Tensor] = []
    handles = [block.register_forward_hook(lambda _m, _i, out: block_outputs.append(out)) for block in encoder.blocks]
    try:
        with torch.no_grad():
            tokens, hidden_states = encode_study(encoder, x, INTERLEAVED)
    finally:
        for handle in handles:
            handle.remove()
    assert len(hidden_states) == len(block_outputs) == TINY_VIT["num_layers"]
    for raw, state in zip(block_outputs, hidden_states):
        assert torch.equal(state[:, 1:], raw[:, 1:])
        for study in range(3):
            members = INTERLEAVED == study
            shared = state[members, 0]
            assert torch.equal(shared, shared[:1].expand_as(shared))
            torch.testing.assert_close(shared[0], raw[members, 0].mean(dim=0))
        # the average really mixes: before it, views of study 0 had different CLS tokens
        assert not torch.allclose(raw[0, 0], raw[2, 0])
    assert torch.equal(tokens, encoder.norm(hidden_states[-1]))


@pytest.mark.parametrize("study_index", [torch.arange(4), torch.tensor([2, 0, 3, 1])], ids=["ordered", "permuted"])
def test_one_view_per_study_equals_the_plain_encoder(study_index):
    encoder = _encoder()
    x = _views(4)
    visible = _visible(4)
    with torch.no_grad():
        tokens, hidden_states = encode_study(encoder, x, study_index)
        plain_tokens, plain_hidden = encoder(x)
        assert torch.equal(tokens, plain_tokens)
        assert all(torch.equal(a, b) for a, b in zip(hidden_states, plain_hidden, strict=True))
        assert torch.equal(encode_study_visible(encoder, x, visible, study_index), encoder.encode_visible(x, visible))
        representation = study_representation(encoder, x, study_index)
        assert torch.equal(representation[study_index], encoder.representation(x))


def test_study_representation_one_row_per_study_invariant_to_view_order():
    encoder = _encoder()
    x = _views(6)
    with torch.no_grad():
        features = study_representation(encoder, x, INTERLEAVED)
        tokens, _ = encode_study(encoder, x, INTERLEAVED)
        # the same studies, contiguous and with the views of each study in another order
        order = torch.tensor([5, 2, 0, 4, 1, 3])
        regrouped = study_representation(encoder, x[order], INTERLEAVED[order])
    assert features.shape == (3, TINY_VIT["hidden_size"])
    for study in range(3):
        assert torch.equal(features[study], tokens[INTERLEAVED == study, 0][0])
    torch.testing.assert_close(regrouped, features, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(features[0], features[1])


def test_gradients_reach_every_view_of_the_study_and_no_other():
    encoder = _encoder()
    x = _views(6).requires_grad_(True)
    study_representation(encoder, x, INTERLEAVED)[0].square().sum().backward()
    per_view = x.grad.abs().flatten(1).sum(dim=1)
    for position, study in enumerate(INTERLEAVED.tolist()):
        if study == 0:
            assert per_view[position] > 0
        else:
            assert per_view[position] == 0


def test_collate_studies_of_two_three_and_five_views():
    views = [_views(count, seed=count) for count in (2, 3, 5)]
    labels = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0])]
    studies = [
        {"images": images, "label": label, "study_id": f"s{i}"} for i, (images, label) in enumerate(zip(views, labels))
    ]
    batch = collate_studies(studies)
    assert torch.equal(batch["images"], torch.cat(views))
    assert batch["study_index"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert batch["study_index"].dtype == torch.int64
    assert batch["num_views"].tolist() == [2, 3, 5]
    assert torch.equal(batch["label"], torch.stack(labels))
    assert batch["study_id"] == ["s0", "s1", "s2"]
    assert torch.equal(views_per_study(batch["study_index"]), batch["num_views"])
    with torch.no_grad():
        features = study_representation(_encoder(), batch["images"], batch["study_index"])
        # each study's feature depends on its own views only
        alone = study_representation(_encoder(), views[1], torch.zeros(3, dtype=torch.int64))
    assert features.shape == (3, TINY_VIT["hidden_size"])
    torch.testing.assert_close(features[1], alone[0])


def test_collate_studies_without_labels_and_with_scalar_labels():
    batch = collate_studies([{"images": _views(2)}, {"images": _views(1)}])
    assert set(batch) == {"images", "study_index", "num_views"}
    assert batch["study_index"].tolist() == [0, 0, 1]
    labelled = collate_studies([{"images": _views(2), "label": 1}, {"images": _views(3), "label": 0}])
    assert labelled["label"].tolist() == [1, 0]


def test_collate_studies_refuses_bad_studies():
    with pytest.raises(ValueError, match="study 1 \\(study_id 'b'\\) has 0 views"):
        collate_studies([{"images": _views(2), "study_id": "a"}, {"images": _views(0), "study_id": "b"}])
    with pytest.raises(ValueError, match="no studies"):
        collate_studies([])
    with pytest.raises(ValueError, match="same \\(C, H, W\\)"):
        collate_studies([{"images": _views(2)}, {"images": torch.rand(2, 1, 16, 16)}])
    with pytest.raises(ValueError, match="studies \\[1\\] have no 'label'"):
        collate_studies([{"images": _views(2), "label": 1}, {"images": _views(2)}])


def test_study_index_errors_name_the_problem():
    encoder = _encoder()
    x = _views(3)
    with pytest.raises(ValueError, match="studies \\[1\\] have no views"):
        encode_study(encoder, x, torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="negative study index -1"):
        encode_study(encoder, x, torch.tensor([0, -1, 0]))
    with pytest.raises(ValueError, match="integer tensor"):
        encode_study(encoder, x, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="expected shape \\(3,\\)"):
        encode_study(encoder, x, torch.tensor([0, 1]))


def test_study_mean_cls_keeps_the_half_precision_mean_whose_sum_overflows_float16():
    # 80 views of values in 900..1099: their sum (at least 72000) exceeds float16's largest value 65504
    values = torch.randint(900, 1100, (80, 2, 4), generator=torch.Generator().manual_seed(0))
    tokens = values.to(torch.float16)
    study_index = torch.zeros(80, dtype=torch.int64)
    assert torch.isinf(tokens[:, 0].sum(dim=0, dtype=torch.float16)).all()
    mixed = study_mean_cls(tokens, study_index)
    assert mixed.dtype == torch.float16
    expected = values[:, 0].double().mean(dim=0).to(torch.float16)
    assert torch.equal(mixed[:, 0], expected.expand(80, -1))
    assert torch.equal(mixed[:, 1:], tokens[:, 1:])


def test_views_per_study_counts_and_num_views_shortcut_and_first_views():
    assert views_per_study(INTERLEAVED, batch_size=6).tolist() == [3, 2, 1]
    assert views_per_study(INTERLEAVED.to(torch.int32)).dtype == torch.int64
    assert first_view_of_study(INTERLEAVED, 3).tolist() == [0, 1, 3]
    assert first_view_of_study(torch.tensor([2, 2, 1, 0, 1]), 3).tolist() == [3, 2, 0]
    tokens = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(
        study_mean_cls(tokens, INTERLEAVED, num_views=views_per_study(INTERLEAVED)),
        study_mean_cls(tokens, INTERLEAVED),
    )
    with pytest.raises(ValueError, match="1-D"):
        views_per_study(INTERLEAVED.reshape(2, 3))
    with pytest.raises(ValueError, match="empty"):
        views_per_study(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer tensor"):
        views_per_study(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="studies \\[0, 2\\] have no views"):
        views_per_study(torch.tensor([1, 3, 1]))


def test_collate_studies_names_the_study_for_missing_images_ids_and_label_shapes():
    with pytest.raises(ValueError, match="study 1 \\(study_id 'b'\\) has no 'images'"):
        collate_studies([{"images": _views(2), "study_id": "a"}, {"study_id": "b"}])
    with pytest.raises(ValueError, match="studies \\[0\\] have no 'study_id'"):
        collate_studies([{"images": _views(2)}, {"images": _views(2), "study_id": "b"}])
    with pytest.raises(ValueError, match="study 1 has a label of shape \\(2,\\), study 0's has \\(3,\\)"):
        collate_studies(
            [{"images": _views(2), "label": torch.zeros(3)}, {"images": _views(2), "label": torch.zeros(2)}]
        )
