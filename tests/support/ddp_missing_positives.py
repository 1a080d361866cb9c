"""Run under ``torchrun --nproc_per_node 2``: rank 0 has positives for some of
its anchors, rank 1 for none, and no rank forwards a missing one
(docs/design.md §5).

1. Every method and CLSP mode, BatchNorm on running statistics: the DDP
   gradients equal one process's on the global batch (the collectives keep
   their shapes although the ranks' counts differ, one being zero).
2. Training mode, per-view and joint passes, two steps each: the steps finish
   with a finite loss, and rank 1's BatchNorm statistics are those of passes
   over its two anchor views alone (it forwarded no third view).

Rank 0 writes the results as JSON to the path in argv[1].
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import torch
from torch import nn

from clsp_positives.distributed import (
    gather_objects,
    init_distributed,
    shutdown_distributed,
)
from clsp_positives.trainer.backbones import build_backbone
from clsp_positives.trainer.methods import MethodConfig, build_method

CASES = [(n, m) for n in ("simclr", "moco", "nnclr") for m in ("similarity", "contrastive")]


def build(name: str, mode: str, joint: bool = False) -> nn.Module:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet-tiny", in_channels=1, image_size=8)
    cfg = MethodConfig(
        name=name, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16,
        clsp_weight=0.5, clsp_mode=mode, joint_forward=joint,
    )  # fmt: skip
    return build_method(cfg, backbone, dim, dataset_size=64)


def wrap(method: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)


def grads(method: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in method.parameters() if p.grad is not None]


def bn_stats(*modules: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var)
    ]


def main() -> None:
    out_path = sys.argv[1]
    g = torch.Generator().manual_seed(1)
    v1, v2, v3 = (torch.randn(8, 1, 8, 8, generator=g) for _ in range(3))
    # Rank 0 (rows 0-3) gets 3 positives, rank 1 (rows 4-7) none.
    mask = torch.tensor([True, True, False, True, False, False, False, False])
    reference = {}
    for name, mode in CASES:
        method = build(name, mode).eval()  # running statistics: per-rank batches match
        method(v1, v2, v3[mask], mask).loss.backward()
        reference[(name, mode)] = grads(method)

    ctx = init_distributed("cpu")
    half = slice(4 * ctx.rank, 4 * ctx.rank + 4)
    rows = mask[half].nonzero().squeeze(1)
    l1, l2, l3 = v1[half], v2[half], v3[half][rows]  # rank 1: l3 is [0, 1, 8, 8]
    worst = {}
    for name, mode in CASES:
        method = build(name, mode).eval()
        model = wrap(method)  # held: the wrapper's reducer averages the gradients
        model(l1, l2, l3, rows).loss.backward()
        diffs = [
            (a - b).abs().max().item()
            for a, b in zip(grads(method), reference[(name, mode)], strict=True)
        ]
        worst[f"{name}/{mode}"] = max(diffs)

    trained = {}
    for name, mode in CASES:
        for joint in (False, True):
            method = build(name, mode, joint)
            model = wrap(method)
            optimizer = torch.optim.SGD(method.parameters(), lr=0.01)
            losses, first = [], []
            for _ in range(2):
                out = model(l1, l2, l3, rows)
                first = first or bn_stats(method.backbone, method.projector)
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
                method.after_step()
                losses.append(out.loss.item())
            # The first step's statistics are those of the same network fed only
            # this rank's anchor views: BatchNorm saw nothing else.
            ref = build(name, mode, joint)
            with torch.no_grad():
                if joint:
                    ref.embed(torch.cat([l1, l2]))
                else:
                    ref.embed(l1), ref.embed(l2)
            same = all(
                torch.allclose(a, b, atol=1e-6)
                for a, b in zip(first, bn_stats(ref.backbone, ref.projector), strict=True)
            )
            trained[f"{name}/{mode}/{'joint' if joint else 'per-view'}"] = {
                "finite": all(math.isfinite(x) for x in losses),
                "anchors_only_stats": same,
            }
    per_rank = gather_objects(trained)
    if ctx.is_main:
        with open(out_path, "w") as f:
            json.dump({"grads": worst, "trained": per_rank}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
