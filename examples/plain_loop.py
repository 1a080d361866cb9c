r"""SimCLR with the CLSP term in a plain PyTorch loop, on scikit-learn's digits
(docs/library.md, "Your own training loop").

    clsp generate --config recipes/digits-generate.yaml \
        --positives http://127.0.0.1:8000 --out banks/digits-k2.npy
    python examples/plain_loop.py banks/digits-k2.npy --steps 200

The bank holds K positives of each of the 1437 digits training images, uint8
[1437, K, 16, 16, 1] (docs/training.md, "A recipe end to end").
"""

import argparse

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from clsp_positives.images import load_images
from clsp_positives.torch import WithPositives, clsp_contrastive_loss, nt_xent

parser = argparse.ArgumentParser(description="SimCLR + CLSP on digits in a plain loop.")
parser.add_argument("bank", help="the positives' .npy of `clsp generate --out`")
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()

digits = load_images("digits")  # 8x8 upscaled to 16x16 grey, as `clsp train --dataset digits`
augment = transforms.Compose(
    [transforms.RandomResizedCrop(16, scale=(0.3, 1.0)), transforms.ToTensor()]
)


class TwoViews(Dataset):
    def __len__(self) -> int:
        return len(digits)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        picture = Image.fromarray(digits.images[i, ..., 0])
        return augment(picture), augment(picture)


data = WithPositives(TwoViews(), args.bank, transform=augment)  # the positive gets a view too
loader = DataLoader(data, batch_size=256, shuffle=True, drop_last=True)
model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
)  # fmt: skip
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
step, epoch = 0, 0
while step < args.steps:
    data.set_epoch(epoch)  # a new candidate of each image every epoch
    for (v1, v2), positive, has_positive in loader:
        z1, z2, z3 = model(torch.cat([v1, v2, positive])).chunk(3)  # one pass, as the authors'
        base = nt_xent(z1, z2, temperature=0.2)
        loss = clsp_contrastive_loss(z1, z2, z3, has_positive, temperature=0.2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        # What the positives add to SimCLR's loss: the CLSP term of the contrastive form.
        print(f"step {step} loss {loss.item():.4f} clsp {loss.item() - base.item():+.4f}")
        if step == args.steps:
            break
    epoch += 1
