r"""SimCLR with the CLSP term as a LightningModule, its positives asked of a pool while it
trains, on scikit-learn's digits (docs/library.md, "With Lightning").

    pip install "clsp-positives[trainer,examples]"
    clsp serve --model models/digits &        # a pool of a digits model (docs/training.md)
    python examples/lightning_module.py http://127.0.0.1:8000 --max-steps 200

The loader yields the raw images and their indices (``Indexed``); ``PositivesStream``
sends each batch's images to the pool ahead of its step, as ``clsp train`` does, and
yields ``(batch, positives, mask)``; the step augments the three views on the batch and
adds the contrastive CLSP term. A positive that missed its deadline is masked out: the
step then trains on the two views alone, as the trainer does.
"""

import argparse

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from torchvision.transforms import v2

from clsp_positives.images import load_images
from clsp_positives.proto.params import GenerationParams
from clsp_positives.torch import Indexed, PositivesStream, clsp_contrastive_loss, nt_xent

parser = argparse.ArgumentParser(description="SimCLR + CLSP on digits with Lightning.")
parser.add_argument("pool", help="the pool's URL(s), comma-separated")
parser.add_argument("--max-steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
parser.add_argument("--deadline-ms", type=float, help="unset: clsp train's default")
parser.add_argument("--gen-steps", type=int, help="sampling steps; unset: the pool's")
args = parser.parse_args()

digits = load_images("digits")  # uint8 [1437, 16, 16, 1], as `clsp train --dataset digits`
crop = v2.RandomResizedCrop(16, scale=(0.3, 1.0), antialias=True)


def view(images: Tensor) -> Tensor:
    """An augmented view of each uint8 [B, H, W, C] image: float [B, C, H, W] in [0, 1]."""
    pixels = images.permute(0, 3, 1, 2).float() / 255
    return torch.stack([crop(picture) for picture in pixels])


class SimCLRWithPositives(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, 32),
        )  # fmt: skip
        self.stream: PositivesStream | None = None

    def train_dataloader(self) -> PositivesStream:
        data = Indexed(digits.images)
        # Under DDP each rank streams its own shard (Trainer(use_distributed_sampler=False):
        # Lightning hands the stream over untouched, so the sampler is ours to choose).
        ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = DistributedSampler(data, drop_last=True) if ddp else RandomSampler(data)
        loader = DataLoader(
            data, args.batch_size, sampler=sampler, drop_last=True,
            num_workers=args.workers, persistent_workers=args.workers > 0,
        )  # fmt: skip
        params = GenerationParams(steps=args.gen_steps)
        self.stream = PositivesStream(
            loader, args.pool, params=params, deadline_ms=args.deadline_ms
        )
        return self.stream

    def on_train_epoch_start(self) -> None:
        assert self.stream is not None
        self.stream.set_epoch(self.current_epoch)  # each epoch's candidates (and shuffle)

    def training_step(self, batch: tuple, batch_idx: int) -> Tensor:
        (images, _), positives, has_positive = batch
        arrived = positives[has_positive]  # only those reach the network and its BatchNorm
        z = self.encoder(torch.cat([view(images), view(images), view(arrived)]))
        z1, z2, z_arrived = z.split([len(images), len(images), len(arrived)])
        z3 = torch.zeros_like(z1).masked_scatter(has_positive[:, None], z_arrived)
        base = nt_xent(z1, z2, 0.2)
        loss = clsp_contrastive_loss(z1, z2, z3, has_positive, 0.2)
        print(
            f"step {self.global_step + 1} loss {loss.item():.4f} "
            f"clsp {loss.item() - base.item():+.4f} positives {len(arrived)}/{len(images)}"
        )
        return loss

    def on_train_end(self) -> None:
        if self.stream is not None:
            print(f"positives: {self.stream.epoch_stats()}")
            self.stream.close()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


trainer = L.Trainer(
    max_steps=args.max_steps, accelerator="auto", devices=1, use_distributed_sampler=False,
    logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False,
)  # fmt: skip
trainer.fit(SimCLRWithPositives())
