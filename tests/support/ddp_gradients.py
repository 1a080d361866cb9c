"""Run under ``torchrun --nproc_per_node 2``: the DDP step on the gathered
batch must equal the single-process step on the global batch.

Each rank first computes the reference (no process group yet, so the gathers
are the identity) on the whole batch, then joins the group and computes the
same loss from its half of the batch through DDP. Rank 0 writes the largest
gradient difference as JSON to the path in argv[1].
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from clsp_positives.distributed import init_distributed, shutdown_distributed
from clsp_positives.trainer.backbones import build_backbone
from clsp_positives.trainer.methods import MethodConfig, build_method


def build(name: str, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet-tiny", in_channels=1, image_size=8)
    cfg = MethodConfig(
        name=name, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16,
        clsp_weight=0.5, clsp_mode=mode,
    )  # fmt: skip
    method = build_method(cfg, backbone, dim, dataset_size=64)
    return method.eval()  # BN on running stats: per-rank batches then match the global one


def grads(method: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in method.parameters() if p.grad is not None]


def main() -> None:
    out_path = sys.argv[1]
    g = torch.Generator().manual_seed(1)
    v1, v2, v3 = (torch.randn(8, 1, 8, 8, generator=g) for _ in range(3))
    # Rank 0 gets 3 positives, rank 1 gets 2: the CLSP mean is over all 5.
    mask = torch.tensor([True, True, False, True, False, True, False, True])
    cases = [
        ("simclr", "similarity"), ("simclr", "contrastive"),
        ("moco", "similarity"), ("nnclr", "contrastive"),
    ]  # fmt: skip
    reference = {}
    for name, mode in cases:
        method = build(name, mode)
        method(v1, v2, v3, mask).loss.backward()
        reference[(name, mode)] = grads(method)

    ctx = init_distributed("cpu")
    half = slice(4 * ctx.rank, 4 * ctx.rank + 4)
    worst = {}
    for name, mode in cases:
        method = build(name, mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
        model(v1[half], v2[half], v3[half], mask[half]).loss.backward()
        diffs = [
            (a - b).abs().max().item()
            for a, b in zip(grads(method), reference[(name, mode)], strict=True)
        ]
        worst[f"{name}/{mode}"] = max(diffs)
    if ctx.is_main:
        with open(out_path, "w") as f:
            json.dump(worst, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
