r"""SimCLR from lightly's pieces with this project's positives and CLSP term, on
scikit-learn's digits (docs/library.md, "With lightly").

    pip install "clsp-positives[trainer,examples]"
    clsp generate --config recipes/digits-generate.yaml \
        --positives http://127.0.0.1:8000 --out banks/digits-k2.npy
    python examples/lightly_simclr.py banks/digits-k2.npy --steps 200 --clsp-mode similarity

lightly gives the views (SimCLRTransform), the projection head and the base loss
(NTXentLoss); this project gives each image's positive (WithPositives, from the bank) and
the term that uses it: ``similarity`` adds the paper's term to lightly's loss,
``contrastive`` replaces that loss with NT-Xent over the three views, which is lightly's
NTXentLoss again where no positive is there.
"""

import argparse

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform, SimCLRViewTransform
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from clsp_positives.images import load_images
from clsp_positives.torch import WithPositives, clsp_contrastive_loss, clsp_similarity_loss

parser = argparse.ArgumentParser(description="lightly's SimCLR + CLSP on digits.")
parser.add_argument("bank", help="the positives' .npy of `clsp generate --out`")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--clsp-mode", choices=["similarity", "contrastive"], default="similarity")
parser.add_argument("--clsp-weight", type=float, default=1.0, help="lambda, the term's weight")
args = parser.parse_args()

digits = load_images("digits")  # 8x8 upscaled to 16x16 grey, as `clsp train --dataset digits`
# Grey 16x16 digits: no colour jitter, grey scale, blur or ImageNet normalisation.
grey = dict(input_size=16, min_scale=0.3, cj_prob=0.0, random_gray_scale=0.0, gaussian_blur=0.0)
two_views = SimCLRTransform(**grey, normalize=None)
one_view = SimCLRViewTransform(**grey, normalize=None)  # the positive's: a third view


class Digits(Dataset):
    def __len__(self) -> int:
        return len(digits)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return two_views(Image.fromarray(digits.images[i, ..., 0]))


data = WithPositives(Digits(), args.bank, transform=one_view)
loader = DataLoader(data, batch_size=256, shuffle=True, drop_last=True)
backbone = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(),
)  # fmt: skip
model = nn.Sequential(backbone, SimCLRProjectionHead(64, 64, 32))
criterion = NTXentLoss(temperature=0.2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
step, epoch = 0, 0
while step < args.steps:
    data.set_epoch(epoch)  # a new candidate of each image every epoch
    for (v1, v2), positive, has_positive in loader:
        z1, z2, z3 = model(torch.cat([v1, v2, positive])).chunk(3)
        base = criterion(z1, z2)
        if args.clsp_mode == "similarity":  # the paper's: L = NT-Xent + lambda * (2 - 2 cos)
            loss = base + args.clsp_weight * clsp_similarity_loss(z1, z3, has_positive)
        else:
            loss = clsp_contrastive_loss(z1, z2, z3, has_positive, 0.2, weight=args.clsp_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        # What the positives add to lightly's SimCLR loss.
        print(f"step {step} loss {loss.item():.4f} clsp {loss.item() - base.item():+.4f}")
        if step == args.steps:
            break
    epoch += 1
