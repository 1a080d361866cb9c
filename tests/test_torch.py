"""clsp_positives.torch: the public losses are the trainer's (a SimCLR step on a tiny backbone
gives the same loss and gradients), and WithPositives draws a bank's candidates per epoch the
way the trainer does, the same in every DataLoader worker and DDP rank (docs/library.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision.transforms import PILToTensor

from clsp_positives.client import PoolClient
from clsp_positives.torch import (
    WithPositives,
    clsp_contrastive_loss,
    clsp_similarity_loss,
    nt_xent,
)
from clsp_positives.trainer.backbones import build_backbone
from clsp_positives.trainer.data.epochs import epoch_candidates
from clsp_positives.trainer.methods import MethodConfig, SimCLR, build_method
from clsp_positives.trainer.positives.offline import progress_path

MASK = torch.tensor([True, False, True, True, False, True])


def _simclr(mode: str, weight: float = 0.7) -> SimCLR:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet-tiny", in_channels=1, image_size=8)
    cfg = MethodConfig(
        name="simclr", proj_hidden_dim=32, proj_dim=16, clsp_weight=weight, clsp_mode=mode
    )
    method = build_method(cfg, backbone, dim, dataset_size=64)
    assert isinstance(method, SimCLR)
    # BatchNorm on running statistics: a projection does not depend on what else is in
    # its pass, so the trainer's pass over the present positives equals ours over all.
    return method.eval()


def _views(n: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 1, 8, 8, generator=g) for _ in range(3)]


def _grads(method: SimCLR, loss: torch.Tensor) -> list[torch.Tensor]:
    method.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in method.parameters() if p.grad is not None]


@pytest.mark.parametrize("mode", ["similarity", "contrastive"])
def test_the_functions_give_the_trainers_step_loss_and_gradients(mode: str) -> None:
    method = _simclr(mode)
    v1, v2, v3 = _views()
    step = method(v1, v2, v3, MASK)
    trainer_grads = _grads(method, step.loss)
    z1, z2, z3 = (method.embed(v) for v in (v1, v2, v3))
    tau = method.config.tau
    if mode == "similarity":
        ours = nt_xent(z1, z2, tau) + 0.7 * clsp_similarity_loss(z1, z3, MASK)
        assert step.clsp.item() == pytest.approx(clsp_similarity_loss(z1, z3, MASK).item())
        assert step.clsp.item() > 0
    else:
        ours = clsp_contrastive_loss(z1, z2, z3, MASK, tau, weight=0.7)
        assert ours.item() != pytest.approx(nt_xent(z1, z2, tau).item(), rel=1e-3)
    assert step.loss.item() == pytest.approx(ours.item(), rel=1e-6)
    for theirs, mine in zip(trainer_grads, _grads(method, ours), strict=True):
        assert torch.allclose(theirs, mine, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in trainer_grads)


@pytest.mark.parametrize("mode", ["similarity", "contrastive"])
def test_no_positive_at_all_leaves_nt_xent_as_the_trainer_does(mode: str) -> None:
    method = _simclr(mode)
    v1, v2, v3 = _views()
    none = torch.zeros(6, dtype=torch.bool)
    step = method(v1, v2, v3, none)
    z1, z2, z3 = (method.embed(v) for v in (v1, v2, v3))
    base = nt_xent(z1, z2, method.config.tau)
    assert step.clsp.item() == 0.0 and step.loss.item() == pytest.approx(base.item(), rel=1e-6)
    if mode == "similarity":
        term = clsp_similarity_loss(z1, z3, none)
        assert term.item() == 0.0
        assert term.requires_grad  # a zero in the graph: DDP ranks without positives join in
    else:
        loss = clsp_contrastive_loss(z1, z2, z3, none, method.config.tau)
        assert loss.item() == pytest.approx(base.item(), rel=1e-6)


def test_rows_without_a_positive_take_no_part_and_no_gradient() -> None:
    g = torch.Generator().manual_seed(2)
    z1, z2, z3 = (torch.randn(6, 16, generator=g, requires_grad=True) for _ in range(3))
    other = z3.detach().clone()
    other[~MASK] = 100 * torch.randn(int((~MASK).sum()), 16, generator=g)
    for loss_of in (
        lambda p: clsp_similarity_loss(z1, p, MASK),
        lambda p: clsp_contrastive_loss(z1, z2, p, MASK, 0.2, weight=0.5),
    ):
        assert loss_of(z3).item() == pytest.approx(loss_of(other).item(), rel=1e-6)
        z3.grad = None
        loss_of(z3).backward()
        assert z3.grad is not None
        assert torch.all(z3.grad[~MASK] == 0)
        assert torch.all(z3.grad[MASK].abs().sum(dim=1) > 0)


def test_the_similarity_term_by_hand_and_its_gradient_reaches_both_sides() -> None:
    z1 = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]], requires_grad=True)
    z3 = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.0, 5.0]], requires_grad=True)
    mask = torch.tensor([True, True, False])
    # 2 - 2cos: 4 for opposite vectors, 0 for parallel ones; the third row does not count.
    loss = clsp_similarity_loss(z1, z3, mask)
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    assert clsp_similarity_loss(z1, z3).item() == pytest.approx((4 + 0 + 2 - 2**0.5) / 3)
    loss.backward()
    assert z1.grad is not None and z3.grad is not None
    assert z1.grad[1].abs().sum() == 0  # parallel: at the minimum
    assert z1.grad[2].abs().sum() == 0 and z3.grad[2].abs().sum() == 0  # masked out


def test_contrastive_loss_refuses_positives_not_one_per_anchor() -> None:
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one row per anchor"):
        clsp_contrastive_loss(z, z, z[:2], torch.tensor([True, True]), 0.2)


# ------------------------------------------------------------------ WithPositives

N, K, SIDE = 12, 3, 4


def _bank(tmp_path: Path, n: int = N, channels: int = 1) -> Path:
    """A bank whose candidate k of image i is filled with 10 i + k, so a positive names
    where it came from."""
    values = 10 * np.arange(n)[:, None] + np.arange(K)[None, :]
    bank = np.broadcast_to(values[:, :, None, None, None], (n, K, SIDE, SIDE, channels))
    path = tmp_path / "bank.npy"
    np.save(path, np.ascontiguousarray(bank, dtype=np.uint8))
    return path


def _images(n: int = N) -> TensorDataset:
    """(image, label) items whose label is the index, to see which item came back."""
    return TensorDataset(torch.zeros(n, SIDE, SIDE, 1, dtype=torch.uint8), torch.arange(n))


def _drawn(positive: torch.Tensor | Image.Image, index: int) -> int:
    """The candidate index a positive of ``_bank`` is."""
    value = int(np.asarray(positive).flat[0])
    assert value // 10 == index, f"item {index} got the positive of image {value // 10}"
    return value % 10


def test_an_item_is_the_datasets_with_this_epochs_candidate_as_pil(tmp_path: Path) -> None:
    data = WithPositives(_images(), _bank(tmp_path), seed=3)
    assert len(data) == N
    for epoch in (0, 1):
        data.set_epoch(epoch)
        expected = epoch_candidates(3, epoch, N, K)
        for i in range(N):
            (image, label), positive, has_positive = data[i]
            assert label.item() == i and image.shape == (SIDE, SIDE, 1)
            assert isinstance(positive, Image.Image) and positive.mode == "L"
            assert positive.size == (SIDE, SIDE)
            assert _drawn(positive, i) == expected[i]
            assert has_positive is True
    epochs = [epoch_candidates(3, e, N, K) for e in (0, 1)]
    assert not np.array_equal(*epochs), "the draw must change with the epoch"


def test_a_transform_gets_the_pil_positive_and_rgb_banks_are_rgb(tmp_path: Path) -> None:
    data = WithPositives(_images(), _bank(tmp_path, channels=3), transform=PILToTensor())
    _, positive, _ = data[5]
    assert isinstance(positive, torch.Tensor) and positive.shape == (3, SIDE, SIDE)
    assert _drawn(positive, 5) == epoch_candidates(0, 0, N, K)[5]


def _positives_seen(loader: DataLoader) -> dict[int, int]:
    seen: dict[int, int] = {}
    for (_, labels), positives, has_positive in loader:
        assert bool(has_positive.all())
        for label, positive in zip(labels.tolist(), positives, strict=True):
            assert label not in seen, f"index {label} came twice in one epoch"
            seen[label] = _drawn(positive, label)
    return seen


def test_dataloader_workers_and_ddp_ranks_agree_on_each_indexs_positive(
    tmp_path: Path,
) -> None:
    data = WithPositives(_images(), _bank(tmp_path), transform=PILToTensor(), seed=7)
    for epoch in (0, 1):
        data.set_epoch(epoch)
        expected = dict(enumerate(epoch_candidates(7, epoch, N, K).tolist()))
        one_process = _positives_seen(DataLoader(data, batch_size=4))
        assert one_process == expected
        ranks = []
        for rank in (0, 1):
            sampler = DistributedSampler(data, num_replicas=2, rank=rank, seed=7)
            sampler.set_epoch(epoch)
            ranks.append(
                _positives_seen(DataLoader(data, batch_size=2, sampler=sampler, num_workers=2))
            )
        assert not set(ranks[0]) & set(ranks[1]), "the ranks must draw disjoint indices"
        assert {**ranks[0], **ranks[1]} == expected


def test_a_pool_url_or_client_is_sent_to_the_batch_wrapper(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"per batch, not per item.*PositivesStream.*library"):
        WithPositives(_images(), "http://127.0.0.1:8000")
    client = PoolClient("http://127.0.0.1:9")
    try:
        with pytest.raises(ValueError, match="PositivesStream"):
            WithPositives(_images(), client)  # type: ignore[arg-type]
    finally:
        client.close()


def test_a_bank_of_another_dataset_or_unfinished_is_refused(tmp_path: Path) -> None:
    path = _bank(tmp_path, n=N + 1)
    with pytest.raises(ValueError, match=rf"{N + 1} images but the dataset has {N}"):
        WithPositives(_images(), path)
    np.save(progress_path(path), np.zeros(N + 1, bool))  # `clsp generate` still running
    with pytest.raises(ValueError, match="incomplete"):
        WithPositives(_images(N + 1), path)
