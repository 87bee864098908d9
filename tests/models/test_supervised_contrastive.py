"""The cross-modal (supervised) contrastive loss on known inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chestssl.models.supervised_contrastive import CrossModalContrastiveLoss, modality_indices

X = [1.0, 0.0]
Y = [0.0, 1.0]


def _reference(embeddings: torch.Tensor, labels: list[int], temperature: float) -> float:
    """Khosla et al.'s L_out written out sample by sample."""
    z = F.normalize(embeddings.double(), dim=1)
    per_anchor = []
    for i in range(len(labels)):
        others = [a for a in range(len(labels)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in others)
        per_anchor.append(-sum(float(z[i] @ z[p]) / temperature - math.log(denominator) for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def test_hand_computed_four_sample_value():
    # Anchors 0, 2 (CT, along x) have positives 1 (y) and each other; anchor 1 (CT, y) has
    # positives 0 and 2 (both orthogonal) and its negative 3 (MR, y) aligned; anchor 3 is
    # the only MR and does not count. With tau = 0.5 every logit is 2 * cosine:
    #   anchor 0: -(1/2) [(0 - log(2 + e^2)) + (2 - log(2 + e^2))] = log(2 + e^2) - 1
    #   anchor 1: -(1/2) [(0 - log(2 + e^2)) + (0 - log(2 + e^2))] = log(2 + e^2)
    #   anchor 2: as anchor 0
    # mean = log(2 + e^2) - 2/3 = 1.57287...
    embeddings = torch.tensor([X, Y, X, Y])
    loss = CrossModalContrastiveLoss(temperature=0.5)(embeddings, ["CT", "CT", "CT", "MR"])
    expected = math.log(2 + math.e**2) - 2 / 3
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.57287, abs=1e-5)


def test_separated_modalities_give_a_lower_loss_than_mixed_ones():
    loss = CrossModalContrastiveLoss(temperature=0.5)
    labels = ["CT", "CT", "MR", "MR"]
    separated = loss(torch.tensor([X, X, Y, Y]), labels)
    mixed = loss(torch.tensor([X, Y, X, Y]), labels)
    # Separated: every anchor sees its positive at cosine 1 and two negatives at 0.
    assert float(separated) == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)
    assert float(mixed) == pytest.approx(math.log(2 + math.e**2), abs=1e-6)
    assert float(separated) < float(mixed)


def test_matches_the_written_out_definition_on_random_embeddings():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(7, 5, generator=generator)
    labels = [0, 1, 0, 2, 1, 0, 2]
    for temperature in (0.1, 0.5, 2.0):
        got = CrossModalContrastiveLoss(temperature)(embeddings, torch.tensor(labels))
        assert float(got) == pytest.approx(_reference(embeddings, labels, temperature), rel=1e-5)
    # Only directions count (embeddings are normalised).
    torch.testing.assert_close(
        CrossModalContrastiveLoss(0.5)(3.0 * embeddings, torch.tensor(labels)),
        CrossModalContrastiveLoss(0.5)(embeddings, torch.tensor(labels)),
    )


def test_names_and_indices_are_the_same_labels():
    assert modality_indices(["MR", "CT", "MR"]).tolist() == [1, 0, 1]
    embeddings = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    loss = CrossModalContrastiveLoss(0.5)
    torch.testing.assert_close(loss(embeddings, ["MR", "CT", "MR", "CT"]), loss(embeddings, torch.tensor([1, 0, 1, 0])))


def test_no_positive_pair_gives_zero_attached_to_the_graph():
    embeddings = torch.randn(2, 3, requires_grad=True)
    loss = CrossModalContrastiveLoss(0.5)(embeddings, ["CT", "MR"])
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert embeddings.grad is not None and torch.count_nonzero(embeddings.grad) == 0


@pytest.mark.parametrize(
    ("modalities", "informative"),
    [
        (None, False),
        (["CT", "CT", "CT"], False),
        (["CT", "MR"], False),
        (["CT", "MR", "CT"], True),
        (["CT", "MR", "PET", "MR"], True),
    ],
)
def test_informative_batches(modalities, informative):
    assert CrossModalContrastiveLoss.informative(modalities) is informative


def test_float32_and_finite_under_autocast_with_a_gradient():
    embeddings = (10 * torch.randn(6, 8, generator=torch.Generator().manual_seed(2))).requires_grad_()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = CrossModalContrastiveLoss(0.05)(embeddings.bfloat16(), ["CT", "CT", "CT", "MR", "MR", "MR"])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all() and torch.count_nonzero(embeddings.grad) > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        CrossModalContrastiveLoss(0.0)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        CrossModalContrastiveLoss(0.5)(torch.randn(2, 3, 4), ["CT", "MR"])
    with pytest.raises(ValueError, match="3 embeddings but 2 labels"):
        CrossModalContrastiveLoss(0.5)(torch.randn(3, 4), ["CT", "MR"])


def _distributed_worker(rank: int, world: int, init_file: str, x, labels, weight, sizes, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        shared = torch.nn.Parameter(weight.clone())
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        loss = CrossModalContrastiveLoss(0.5)(x[rows] @ shared, labels[rows], gather_across_processes=True)
        loss.backward()
        grad = shared.grad.clone()
        dist.all_reduce(grad)  # what DDP does: average the gradients over the processes
        results[rank] = (float(loss.detach()), grad / world)
    finally:
        dist.destroy_process_group()


def test_under_ddp_the_gathered_loss_gives_the_gradients_of_the_whole_batch(tmp_path):
    """Two processes holding 5 and 3 of 8 samples train as one process holding all 8: each
    anchor is contrasted with the other process's samples too (seed 003 trained on 8 GPUs)."""
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(8, 6, generator=generator), torch.randn(6, 4, generator=generator)
    labels = ["ct", "ct", "xr", "ct", "xr", "xr", "ct", "xr"]
    shared = torch.nn.Parameter(weight.clone())
    whole = CrossModalContrastiveLoss(0.5)(x @ shared, labels)
    whole.backward()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, str(tmp_path / "pg"), x, labels, weight, [5, 3], results), nprocs=2)
        results = dict(results)
    # Each process's loss is its anchors' share, times the process count.
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(float(whole.detach()), rel=1e-5)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][1], shared.grad, rtol=1e-4, atol=1e-6)
