"""A positive that did not arrive never touches the network (docs/design.md §5):
it is not augmented, not forwarded, and leaves the BatchNorm statistics alone.

The step is built as the train loop builds it (``positive_view`` on what the
prefetcher hands over), with the missing rows filled with garbage: whatever the
garbage, the loss and every BatchNorm layer's running statistics must be those
of the same step given only the positives that arrived.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clsp_positives.trainer.backbones import build_backbone
from clsp_positives.trainer.data.augment import BatchAugment
from clsp_positives.trainer.methods import MethodConfig, build_method
from clsp_positives.trainer.positives.pending import PositivesBatch
from clsp_positives.trainer.train_loop import positive_view

B, SIZE = 8, 8
MASK = np.array([True, False, True, False, True, True, False, False])


def _method(name: str, mode: str, **kw):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet-tiny", in_channels=1, image_size=SIZE)
    cfg = MethodConfig(
        name=name, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=64,
        clsp_weight=0.5, clsp_mode=mode, **kw,
    )  # fmt: skip
    return build_method(cfg, backbone, dim, dataset_size=64)


def _images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (B, SIZE, SIZE, 1), dtype=np.uint8)


ANCHORS, POSITIVES = _images(1), _images(2)


def _garbage(seed: int) -> np.ndarray:
    """The positives with their missing rows full of noise (not black)."""
    images = POSITIVES.copy()
    images[~MASK] = _images(100 + seed)[~MASK]
    return images


def _bn_stats(method: nn.Module) -> list[torch.Tensor]:
    stats = []
    for module in method.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            stats += [module.running_mean.clone(), module.running_var.clone()]
    assert stats
    return stats


def _augment() -> BatchAugment:
    return BatchAugment(SIZE, [0.5], [0.25], seed=3)


def _loop_step(name: str, mode: str, positives: np.ndarray, mask: np.ndarray = MASK):
    """One step as ``_run_epoch`` makes it: the positive view first, then the two views."""
    method, augment = _method(name, mode), _augment()
    batch = PositivesBatch(images=positives, mask=mask, cache_hits=0)
    v3, present = positive_view(batch, augment, 1, keep_empty=False)
    anchors = torch.from_numpy(ANCHORS)
    v1, v2 = augment(anchors), augment(anchors)
    out = method(v1, v2, v3, present)
    out.loss.backward()
    return out, _bn_stats(method)


def _present_only_step(name: str, mode: str):
    """The reference: v3 made from the positives that arrived and nothing else."""
    method, augment = _method(name, mode), _augment()
    v3 = augment(torch.from_numpy(np.ascontiguousarray(POSITIVES[MASK])))
    anchors = torch.from_numpy(ANCHORS)
    v1, v2 = augment(anchors), augment(anchors)
    out = method(v1, v2, v3, torch.from_numpy(MASK))
    out.loss.backward()
    return out, _bn_stats(method)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.allclose(x, y, atol=1e-5, rtol=1e-5) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["simclr", "moco", "nnclr"])
@pytest.mark.parametrize("mode", ["similarity", "contrastive"])
def test_missing_positives_are_never_read(name: str, mode: str) -> None:
    ref, ref_stats = _present_only_step(name, mode)
    for seed in (0, 1):
        out, stats = _loop_step(name, mode, _garbage(seed))
        assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
        assert out.clsp.item() == pytest.approx(ref.clsp.item(), abs=1e-5)
        assert _same(stats, ref_stats)
    if mode == "similarity":
        assert ref.clsp.item() > 0  # the positives that arrived do count
    # The check has teeth: the garbage, were it forwarded, moves the statistics.
    everything = np.ones(B, dtype=bool)
    _, forwarded_0 = _loop_step(name, mode, _garbage(0), everything)
    _, forwarded_1 = _loop_step(name, mode, _garbage(1), everything)
    assert not _same(forwarded_0, forwarded_1)


@pytest.mark.parametrize("name", ["simclr", "moco", "nnclr"])
def test_a_step_without_positives_forwards_no_third_view(name: str) -> None:
    none = np.zeros(B, dtype=bool)
    batch = PositivesBatch(images=_garbage(0), mask=none, cache_hits=0)
    assert positive_view(batch, _augment(), 1, keep_empty=False) == (None, None)
    v3, present = positive_view(batch, _augment(), 1, keep_empty=True)  # under DDP
    assert v3 is not None and v3.shape == (0, 1, SIZE, SIZE)
    assert present is not None and present.shape == (0,)
    out, stats = _loop_step(name, "similarity", _garbage(0), none)
    method, augment = _method(name, "similarity"), _augment()
    anchors = torch.from_numpy(ANCHORS)
    baseline = method(augment(anchors), augment(anchors))
    assert out.loss.item() == pytest.approx(baseline.loss.item(), abs=1e-6)
    assert out.clsp.item() == 0.0 and out.z_std_positives is None
    assert _same(stats, _bn_stats(method))
    # An empty view given to the method (a single process) is no positive either.
    empty = method(augment(anchors), augment(anchors), v3, present)
    assert empty.z_std_positives is None and empty.clsp.item() == 0.0


def test_the_positive_view_augments_only_the_rows_that_arrived() -> None:
    batch = PositivesBatch(images=_garbage(0), mask=MASK, cache_hits=0)
    v3, present = positive_view(batch, _augment(), 1, keep_empty=False)
    assert present is not None and present.tolist() == np.flatnonzero(MASK).tolist()
    expected = _augment()(torch.from_numpy(np.ascontiguousarray(POSITIVES[MASK])))
    assert v3 is not None and torch.equal(v3, expected)
    # Three-channel positives for one-channel data are made to fit, still only those rows.
    rgb = PositivesBatch(images=np.repeat(_garbage(1), 3, axis=-1), mask=MASK, cache_hits=0)
    v3_rgb, _ = positive_view(rgb, _augment(), 1, keep_empty=False)
    assert v3_rgb is not None and v3_rgb.shape == (int(MASK.sum()), 1, SIZE, SIZE)
