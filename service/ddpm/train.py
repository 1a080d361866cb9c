"""DDPM training: the unconditional pixel-space models the CLSP sampler draws positives from.

Epsilon prediction on uniformly drawn timesteps of the model's own scheduler (linear betas
1e-4..0.02, T=1000 by default), AdamW with warm-up and gradient clipping, and an EMA copy of the
weights: the EMA copy is what gets saved and sampled, since it gives much cleaner samples than
the raw weights after a short run.

``--out`` holds the DDPM pipeline layout (``unet/`` with the EMA weights, ``scheduler/``), the
training state (``train_state.pt``: raw weights, EMA, optimizer, step) so that a second run
with the same ``--out`` resumes where the first stopped, ``samples.png``, and the run's log:
``metrics.jsonl``, ``curves.png`` and with ``--tensorboard`` ``tensorboard/``
(service/ddpm/tracking.py).

At scale (docs/training.md, "Training the DDPM at scale"): under torchrun the UNet is wrapped
in DDP and the global ``--batch-size`` split over the ranks; every random draw is a pure
function of ``--seed``, the step and the rank (``derived_seed``), so the state needs no RNG
or data position and a resumed run at the same world size continues bit for bit. Rank 0
alone writes; the others wait at the closing barrier. ``--precision`` runs the UNet under
autocast, ``--data-workers`` streams an image folder (``clsp_positives/streamed.py``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clsp_positives.config_file import RUN_CONFIG_NAME, write_config_file
from clsp_positives.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    gather_nograd,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)
from clsp_positives.proto.keys import unit_to_uint8
from clsp_positives.service.ddpm.config import COMMAND, DiffusionTrainConfig
from clsp_positives.service.ddpm.sample_quality import (
    SKIPPED,
    InceptionFeatures,
    QualityScores,
    SampleQuality,
    check_quality,
    inception_skip_reason,
    inception_weights,
)
from clsp_positives.service.ddpm.tracking import DiffusionLog, check_tracking

if TYPE_CHECKING:
    from clsp_positives.images import ImageSet
    from clsp_positives.service.ddpm.latents import LatentData
    from clsp_positives.streamed import LoadedBatch, StreamedImages

STATE_FILE = "train_state.pt"
SAMPLES_FILE = "samples.png"
STATE_VERSION = 2
READABLE_STATES = (1, STATE_VERSION)
"""Version 1 (one process, a saved generator and data position) resumes too: its
weights, EMA, optimizer and step carry over, and the draws follow ``derived_seed``."""

ORDER, NOISE, EVAL_NOISE, EVAL_REAL = 0, 1, 2, 3
"""The purposes ``derived_seed`` keys its seeds by: an epoch's data order, a step's noise,
and the FID/KID evaluation's sample noise and choice of real images."""


@dataclass(frozen=True)
class TrainResult:
    out: Path
    step: int
    start_step: int
    loss: float  # mean loss over the last logging window (~2 s)
    images_per_s: float
    seconds: float
    parameters: int
    is_main: bool = True  # rank 0 (or no torchrun): the rank that wrote --out
    quality: QualityScores | None = None  # FID/KID at ``step`` (--eval-every), else None


def derived_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 63-bit seed for one draw (the order of epoch ``e``; the noise of rank ``r`` at
    step ``s``) from ``--seed``: a pure function of its keys, so a resumed run redraws
    exactly what the stopped one would have, and ranks draw independent noise."""
    words = np.random.SeedSequence([seed % 2**64, purpose, *keys]).generate_state(1, np.uint64)
    return int(words[0]) >> 1


def precision_dtype(
    precision: str, device: torch.device, *, cpu_bf16: bool | None = None
) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device`` (None: fp32, no autocast), or a
    ValueError where it would be emulated. bf16 on a CPU needs native bf16 (AVX512-BF16 or
    AMX), as ``clsp serve --dtype`` decides (``generator.cpu_has_bf16``; docs/performance.md);
    fp16 needs CUDA. ``cpu_bf16`` overrides the CPU check (None: ask this machine)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(
                f"--precision fp16 runs on CUDA only (its gradient scaler and kernels), not on "
                f"--device {device}: use --precision bf16 or fp32"
            )
        return torch.float16
    if precision != "bf16":
        raise ValueError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    if device.type == "cpu":
        if cpu_bf16 is None:
            from clsp_positives.service.sampling.generator import cpu_has_bf16

            cpu_bf16 = cpu_has_bf16()
        if not cpu_bf16:
            raise ValueError(
                "--precision bf16 on this CPU would be emulated (no AVX512-BF16 or AMX), "
                "slower than fp32: use --precision fp32, or a GPU"
            )
    return torch.bfloat16


# ---------------------------------------------------------------- pure schedule helpers


def lr_at(config: DiffusionTrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then constant or cosine decay over the run's progress (0..1)."""
    warm = min(1.0, (step + 1) / config.lr_warmup) if config.lr_warmup else 1.0
    if config.lr_schedule == "cosine":
        # Floor at 10% so a run stopped by time never ends on a vanishing rate.
        warm *= 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return config.lr * warm


def ema_decay_at(max_decay: float, step: int) -> float:
    """EMA warm-up: early averages forget the random init fast (decay (1+s)/(10+s))."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*H, cols*W, C] tile (no padding; blanks are 0)."""
    n, h, w, c = images.shape
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h : (r + 1) * h, k * w : (k + 1) * w] = img
    return grid


# ---------------------------------------------------------------- model construction


def resolve_unet_config(preset: str, *, sample_size: int, channels: int) -> dict[str, Any]:
    """A preset name (``presets.unet_config``) or a JSON file holding a UNet2DModel config."""
    path = Path(preset)
    if path.suffix == ".json" and path.is_file():
        cfg = json.loads(path.read_text())
        cfg.update(sample_size=sample_size, in_channels=channels, out_channels=channels)
        return cfg
    from clsp_positives.service.ddpm import presets

    return presets.unet_config(preset, sample_size=sample_size, channels=channels)


def build_unet(unet_config: dict[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DModel

    keep = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    return UNet2DModel(**keep)


# ---------------------------------------------------------------- data order


class BatchOrder:
    """The global batches: epoch ``e`` is a permutation of the set seeded by
    ``derived_seed(seed, ORDER, e)``, cut into ``n // batch_size`` batches (the incomplete
    last one dropped). A pure function of the step, so a resumed run needs no saved
    position, and every rank computes the same global batch and trains on its own
    disjoint slice of it (``rank_batch``)."""

    def __init__(self, n: int, batch_size: int, seed: int, *, world_size: int = 1) -> None:
        if n < 1:
            raise ValueError("the data set is empty")
        if n < world_size:
            raise ValueError(f"the data set has {n} images, fewer than the {world_size} ranks")
        # A set smaller than the batch is one batch, still split evenly over the ranks.
        self.batch_size = min(batch_size, n - n % world_size)
        self.n, self.seed, self.world_size = n, seed, world_size
        self.per_rank = self.batch_size // world_size
        self.steps_per_epoch = n // self.batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def global_batch(self, step: int) -> torch.Tensor:
        epoch, row = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, ORDER, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[row * self.batch_size : (row + 1) * self.batch_size]

    def rank_batch(self, step: int, rank: int) -> torch.Tensor:
        return self.global_batch(step)[rank * self.per_rank : (rank + 1) * self.per_rank]

    def rank_batches(self, start: int, stop: int | None, rank: int) -> Iterator[list[int]]:
        """Rank ``rank``'s batches of steps ``start..stop`` (on without end for None): a
        streamed loader's ``batch_sampler``."""
        steps = itertools.count(start) if stop is None else range(start, stop)
        for step in steps:
            yield self.rank_batch(step, rank).tolist()


# ---------------------------------------------------------------- training


class DiffusionTrainer:
    """One DDPM training run on one rank: state, a step, checkpoints and a sample grid."""

    def __init__(self, config: DiffusionTrainConfig, ctx: DistributedContext | None = None) -> None:
        from diffusers import DDPMScheduler

        from clsp_positives.service.ddpm import presets

        self.config = config
        self.ctx = ctx or DistributedContext(0, 1, 0, resolve_device(config.device))
        self.out = Path(config.out)
        self.device = self.ctx.device
        if config.batch_size % self.ctx.world_size:
            raise ValueError(
                f"--batch-size {config.batch_size} is the global batch, split evenly over the "
                f"{self.ctx.world_size} ranks of this torchrun: make it a multiple of "
                f"{self.ctx.world_size}"
            )
        self.autocast_dtype = precision_dtype(config.precision, self.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        data = _load_data(config, self.ctx)
        self.data_name = data.name
        self.streamed = data if config.data_workers else None
        self.images = torch.empty(0, dtype=torch.uint8)
        if self.streamed is None:
            # uint8 NCHW on the device: the whole set, indexed by each step's batch.
            self.images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
            self.images = self.images.to(self.device)
        n, self.image_size, _, self.image_channels = _shape(data)
        # What the UNet sees: the pictures, or with --vae their latents (docs/latent.md).
        self.sample_size, self.channels = self.image_size, self.image_channels
        self.autoencoder = None
        self.latents: LatentData | None = None
        if config.vae:
            if self.streamed is not None:
                raise ValueError(
                    "--vae encodes the whole set before the first step, which a streamed "
                    "folder does not hold: load it in memory (--data-workers 0)"
                )
            from clsp_positives.service.ddpm.latents import encode_data_set
            from clsp_positives.service.sampling.model import load_autoencoder

            self.autoencoder = load_autoencoder(config.vae).to(self.device)
            self.latents = encode_data_set(
                self.autoencoder,
                self.images,
                flips=config.use_flip,
                progress=config.progress and self.ctx.is_main,
            )
            self.channels, self.sample_size = self.latents.chw[0], self.latents.chw[1]

        state = self._load_state()
        if state is not None:
            self.unet_config = state["unet_config"]
            self.scheduler_config = state["scheduler_config"]
            self._check_compatible(state)
        else:
            self.unet_config = resolve_unet_config(
                config.preset, sample_size=self.sample_size, channels=self.channels
            )
            self.scheduler_config = presets.default_scheduler_config()
        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError("diffusion train supports epsilon prediction only")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        ab = scheduler.alphas_cumprod.to(torch.float32)
        self.sqrt_ab = ab.sqrt().to(self.device)
        self.sqrt_1mab = (1.0 - ab).sqrt().to(self.device)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.unet = build_unet(self.unet_config).to(self.device)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        # fp16's range needs loss scaling; bf16 has fp32's exponent and does not.
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.order = BatchOrder(n, config.batch_size, config.seed, world_size=self.ctx.world_size)
        self.step = 0
        if state is not None:
            # Loaded onto the CPU; load_state_dict copies into the device tensors.
            self.unet.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
            self.step = int(state["step"])
        self.start_step = self.step
        self.parameters = sum(p.numel() for p in self.unet.parameters())
        self.model: torch.nn.Module = self.unet
        if self.ctx.distributed:
            # Gradients are averaged over the ranks in backward, so every rank takes the
            # same optimizer step and holds the same weights and EMA.
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self._loaded = self._open_loader() if self.streamed is not None else None

    # -- state

    def _load_state(self) -> dict[str, Any] | None:
        path = self.out / STATE_FILE
        if not path.is_file():
            return None
        # Tensors, numbers, strings and plain containers only: no pickled objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") not in READABLE_STATES:
            raise ValueError(f"{path} is not a training state of this version; use a new --out")
        return state

    def _check_compatible(self, state: dict[str, Any]) -> None:
        saved = state["data"]
        here = self._data_identity()
        if saved != here:
            raise ValueError(
                f"--out {str(self.out)!r} holds a run on {saved}, not {here}: use the same "
                "--dataset/--image-size/--channels to resume, or a new --out"
            )
        ranks = int(state.get("world_size", 1))
        if ranks != self.ctx.world_size:
            raise ValueError(
                f"--out {str(self.out)!r} holds a run trained on {ranks} rank(s), and this run "
                f"has {self.ctx.world_size}: resume it with {ranks} (torchrun --nnodes x "
                f"--nproc-per-node = {ranks}), since each rank's noise and the order the "
                "gradients are summed in depend on the world size, or use a new --out"
            )

    def _data_identity(self) -> dict[str, Any]:
        """What a resumed run must train on again: the set, its pictures' size and
        channels, and with ``--vae`` the latents' shape and the autoencoder's kind."""
        data: dict[str, Any] = {
            "dataset": self.data_name,
            "size": self.image_size,
            "channels": self.image_channels,
        }
        if self.autoencoder is not None and self.latents is not None:
            data["latent"] = [*self.latents.chw, self.autoencoder.kind]
        return data

    def state_dict(self) -> dict[str, Any]:
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "model": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "unet_config": self.unet_config,
            "scheduler_config": self.scheduler_config,
            "data": self._data_identity(),
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
            "world_size": self.ctx.world_size,
            "precision": self.config.precision,
        }
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def save(self) -> None:
        """EMA weights in the pipeline layout, then the state (each written atomically).
        Rank 0's job: every rank holds the same weights (see ``check_replicas_agree``)."""
        from clsp_positives.service.ddpm import presets

        if not self.ctx.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        presets.save_model(self.ema, self.scheduler_config, self.out)
        if self.autoencoder is not None:
            from clsp_positives.service.sampling.autoencoder import AUTOENCODER_DIRS

            where = self.out / AUTOENCODER_DIRS[self.autoencoder.kind]
            if not (where / "config.json").is_file():
                self.autoencoder.model.save_pretrained(where)
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.out / STATE_FILE)

    @torch.no_grad()
    def check_replicas_agree(self) -> None:
        """Every rank's EMA is the one rank 0 saves; a difference (a rank-dependent
        learning rate, a missed all-reduce) would otherwise pass silently."""
        if not self.ctx.distributed:
            return
        total = torch.stack([p.double().sum() for p in self.ema.parameters()]).sum()
        sums = gather_nograd(total.view(1))
        if not bool((sums == sums[0]).all()):
            raise RuntimeError(f"the ranks' EMA weights differ (sums {sums.tolist()})")

    # -- training

    def _open_loader(self) -> Iterator[LoadedBatch]:
        """The streamed folder's loader over this rank's batches of the remaining steps
        (its own ``BatchOrder``: the workers' read-ahead leaves the step's untouched)."""
        assert self.streamed is not None
        order = BatchOrder(
            self.order.n, self.config.batch_size, self.config.seed, world_size=self.ctx.world_size
        )
        batches = order.rank_batches(self.step, self.config.steps, self.ctx.rank)
        return iter(self.streamed.loader(batches))

    def close(self) -> None:
        """Stop a streamed loader's workers."""
        self._loaded = None

    def batch(self, g: torch.Generator) -> torch.Tensor:
        """This rank's share of the step's batch in [-1, 1] (or latents), flipped by ``g``."""
        idx = self.order.rank_batch(self.step, self.ctx.rank)
        if self.latents is not None:
            return self.latents.batch(idx.to(self.device), g if self.config.use_flip else None)
        if self._loaded is not None:
            loaded = next(self._loaded)
            if not torch.equal(loaded.indices, idx):
                raise RuntimeError("the streamed loader is out of step with the batch order")
            pixels = loaded.images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            pixels = pixels.contiguous()  # NCHW as in memory: channels-last convs round otherwise
        else:
            pixels = self.images[idx.to(self.device)]
        x = pixels.to(torch.float32).div_(127.5).sub_(1.0)
        if self.config.use_flip:
            flip = (torch.rand(len(x), generator=g) < 0.5).to(self.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, progress: float) -> torch.Tensor:
        """One optimizer step; returns the loss tensor (not synced, so GPUs run ahead)."""
        # Every draw of the step from one CPU generator seeded by (seed, step, rank): a
        # resumed run draws what the stopped one would have, on any device.
        g = torch.Generator().manual_seed(
            derived_seed(self.config.seed, NOISE, self.step, self.ctx.rank)
        )
        x0 = self.batch(g)
        n = len(x0)
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=g)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        t = t.to(self.device)
        xt = self.sqrt_ab[t].view(n, 1, 1, 1) * x0 + self.sqrt_1mab[t].view(n, 1, 1, 1) * noise
        with self._autocast():
            pred = self.model(xt, t, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.config, self.step, progress)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        ema_update(self.ema, self.unet, ema_decay_at(self.config.ema_decay, self.step))
        self.step += 1
        return loss.detach()

    @torch.inference_mode()
    def sample(self, count: int, steps: int, seed: int) -> np.ndarray:
        """Plain DDIM (eta 0) samples of the EMA model, uint8 NHWC."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        shape = (count, self.channels, self.sample_size, self.sample_size)
        x = torch.randn(shape, generator=g).to(self.device)
        for t in scheduler.timesteps:
            eps = self.ema(x, t).sample
            x = scheduler.step(eps, t, x).prev_sample
        if self.autoencoder is not None:
            x = self.autoencoder.decode(x)
        return unit_to_uint8(x.clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy())

    def generated(self, count: int, steps: int) -> np.ndarray:
        """``count`` samples for an evaluation, ``--batch-size`` at a time (memory), each
        chunk's noise seeded by (``--seed``, chunk): every evaluation draws the same noise,
        so its scores differ by the model alone."""
        size, seed = self.config.batch_size, self.config.seed
        chunks = [
            self.sample(min(size, count - start), steps, derived_seed(seed, EVAL_NOISE, i))
            for i, start in enumerate(range(0, count, size))
        ]
        return np.concatenate(chunks)

    def real_images(self, count: int) -> np.ndarray:
        """Up to ``count`` training images (uint8 NHWC), a seeded draw without repeats:
        the reference set the samples are scored against."""
        g = torch.Generator().manual_seed(derived_seed(self.config.seed, EVAL_REAL))
        idx = torch.randperm(self.order.n, generator=g)[:count]
        if self.streamed is not None:
            return self.streamed.anchors(idx.numpy())
        return self.images[idx.to(self.device)].permute(0, 2, 3, 1).cpu().numpy()

    def sample_grid(self) -> np.ndarray | None:
        """``samples.png``'s grid (``sample_count`` seeded samples), or None for none."""
        if self.config.sample_count == 0:
            return None
        return image_grid(
            self.sample(self.config.sample_count, self.config.sample_steps, self.config.seed)
        )

    def write_samples(self, grid: np.ndarray | None = None) -> Path | None:
        grid = self.sample_grid() if grid is None else grid
        if grid is None:
            return None
        from PIL import Image

        path = self.out / SAMPLES_FILE
        Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(path)
        return path


def _load_data(config: DiffusionTrainConfig, ctx: DistributedContext) -> ImageSet | StreamedImages:
    """The training set: an image folder streamed by ``--data-workers`` processes, or the
    set in memory. With ``--download`` under torchrun, rank 0 fetches it while the others
    wait, so no two ranks write the same files."""
    if config.data_workers:
        from clsp_positives.streamed import open_streamed

        return open_streamed(
            config.dataset,
            split="train",
            size=config.image_size,
            channels=config.channels,
            workers=config.data_workers,
            pin_memory=ctx.device.type == "cuda",
        )
    from clsp_positives.images import load_images

    def load(download: bool) -> ImageSet:
        return load_images(
            config.dataset,
            split="train",
            size=config.image_size,
            channels=config.channels,
            root=config.data_root,
            download=download,
        )

    if not (config.download and ctx.distributed):
        return load(config.download)
    if not ctx.is_main:
        barrier()
        return load(False)
    data = load(True)
    barrier()
    return data


def _shape(data: ImageSet | StreamedImages) -> tuple[int, int, int, int]:
    """``(N, H, W, C)`` of a set in memory or streamed."""
    from clsp_positives.streamed import StreamedImages

    shape = data.shape if isinstance(data, StreamedImages) else data.images.shape
    n, h, w, c = (int(v) for v in shape)
    return n, h, w, c


def _progress_bar(config: DiffusionTrainConfig, start: int, *, show: bool) -> Any:
    from tqdm.auto import tqdm

    total = config.steps if config.steps is not None else None
    return tqdm(
        total=total,
        initial=start,
        disable=not (config.progress and show),
        unit="step",
        dynamic_ncols=True,
        desc="diffusion train",
    )


def train(
    config: DiffusionTrainConfig,
    *,
    on_step: Callable[[int, float], None] | None = None,
    on_start: Callable[[DiffusionTrainConfig, Path], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    feature_extractor: torch.nn.Module | None = None,
    say: Callable[[str], None] = print,
) -> TrainResult:
    """Train until ``steps`` (total) or ``minutes`` (this run), whichever comes first.

    ``clock`` measures the ``minutes`` budget (wall time by default); a benchmark on a shared
    machine can pass process CPU time instead so that other load does not shrink its budget.
    Before the first step the resolved configuration goes to ``--out``'s ``config.yaml``
    and, with the file's path, to ``on_start`` (the command prints it).

    Under torchrun every rank runs this and joins the process group here (gloo on the CPU,
    NCCL on CUDA); rank 0 writes ``--out`` and the others wait for it at the closing
    barrier, so that on every rank the model is complete when this returns
    (docs/training.md, "Training the DDPM at scale").

    With ``--eval-every``, rank 0 scores the EMA model's samples by FID and KID
    (``sample_quality.py``) on the features of ``feature_extractor`` (uint8 ``[N, C, H,
    W]`` -> ``[N, D]``), by default the Inception network from a local weights file; a
    run that cannot score says why through ``say``, once, and trains on.
    """
    check_tracking(config.tensorboard)
    check_quality(config.eval_every, config.fid_weights)
    ctx = init_distributed(config.device)
    try:
        trainer = DiffusionTrainer(config, ctx)
        try:
            result = _run(
                trainer,
                on_step=on_step,
                on_start=on_start,
                clock=clock,
                quality=_open_quality(trainer, feature_extractor, say),
            )
        finally:
            trainer.close()
    except BaseException:
        shutdown_distributed(wait_for_peers=False)
        raise
    shutdown_distributed()
    return result


def _run(
    trainer: DiffusionTrainer,
    *,
    on_step: Callable[[int, float], None] | None,
    on_start: Callable[[DiffusionTrainConfig, Path], None] | None,
    clock: Callable[[], float],
    quality: SampleQuality | None = None,
) -> TrainResult:
    config, main = trainer.config, trainer.ctx.is_main
    resolved = config.resolved(trainer.image_size, trainer.image_channels)
    if main:
        written = write_config_file(
            trainer.out / RUN_CONFIG_NAME, resolved.model_dump(mode="json"), command=COMMAND
        )
        if on_start is not None:
            on_start(resolved, written)
    run_log = (
        DiffusionLog(trainer.out, tensorboard=config.tensorboard, start_step=trainer.step)
        if main
        else None
    )
    budget_s = config.minutes * 60.0 if config.minutes is not None else math.inf
    t0 = clock()
    window_loss: list[torch.Tensor] = []
    last_loss = float("nan")
    window_t, window_n = t0, 0
    ips = 0.0
    scores: tuple[int, QualityScores] | None = None
    bar = _progress_bar(config, trainer.step, show=main)
    try:
        trainer.unet.train()
        while config.steps is None or trainer.step < config.steps:
            elapsed = _shared_elapsed(trainer.ctx, clock() - t0, budget_s)
            if elapsed >= budget_s:
                break
            progress = max(
                trainer.step / config.steps if config.steps else 0.0,
                elapsed / budget_s if math.isfinite(budget_s) else 0.0,
            )
            window_loss.append(trainer.train_step(progress))
            window_n += trainer.order.batch_size  # the global batch: every rank's share
            if on_step is not None:
                on_step(trainer.step, float(window_loss[-1]))
            now = clock()
            if now - window_t >= 2.0 or trainer.step == config.steps:
                last_loss = float(torch.stack(window_loss).mean())
                ips = window_n / max(now - window_t, 1e-9)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.0f}")
                if run_log is not None:
                    run_log.window(trainer.step, last_loss, _lr(trainer), ips)
                window_t, window_n, window_loss = now, 0, []
            bar.update(1)
            if trainer.step % config.save_every == 0:
                trainer.save()
                if run_log is not None and run_log.wants_samples:
                    run_log.samples(trainer.step, trainer.sample_grid())
            if quality is not None and trainer.step % config.eval_every == 0:
                scores = _evaluate(trainer, quality, run_log)
    except BaseException:
        if run_log is not None:
            run_log.close()
        raise
    finally:
        bar.close()
    if window_loss:
        last_loss = float(torch.stack(window_loss).mean())
        if run_log is not None:
            rate = window_n / max(clock() - window_t, 1e-9)
            run_log.window(trainer.step, last_loss, _lr(trainer), rate)
    seconds = clock() - t0
    if ips == 0.0 and seconds > 0:
        ips = (trainer.step - trainer.start_step) * trainer.order.batch_size / seconds
    trainer.check_replicas_agree()
    trainer.save()
    if quality is not None and (scores is None or scores[0] != trainer.step):
        scores = _evaluate(trainer, quality, run_log)
    if run_log is not None:
        grid = trainer.sample_grid()
        trainer.write_samples(grid)
        run_log.samples(trainer.step, grid)
        run_log.close()
    return TrainResult(
        out=trainer.out,
        step=trainer.step,
        start_step=trainer.start_step,
        loss=last_loss,
        images_per_s=ips,
        seconds=seconds,
        parameters=trainer.parameters,
        is_main=main,
        quality=scores[1] if scores is not None else None,
    )


def _open_quality(
    trainer: DiffusionTrainer, extractor: torch.nn.Module | None, say: Callable[[str], None]
) -> SampleQuality | None:
    """Rank 0's FID/KID scorer with the real images' features extracted, or None: off,
    another rank (only rank 0 writes), or no Inception that fits, said in one line."""
    config = trainer.config
    if not config.eval_every or not trainer.ctx.is_main:
        return None
    if extractor is None:
        reason = inception_skip_reason(config.fid_weights, trainer.image_size)
        if reason is not None:
            say(f"{SKIPPED} {reason}")
            return None
        weights = inception_weights(config.fid_weights)
        assert weights is not None  # inception_skip_reason checked it
        extractor = InceptionFeatures(weights)
    return SampleQuality(
        extractor,
        trainer.real_images(config.eval_samples),
        device=trainer.device,
        batch=config.batch_size,
        seed=config.seed,
    )


def _evaluate(
    trainer: DiffusionTrainer, quality: SampleQuality, run_log: DiffusionLog | None
) -> tuple[int, QualityScores]:
    """Score ``--eval-samples`` EMA samples now; the other ranks wait for rank 0 at
    their next all-reduce, as they do for a checkpoint's sample grid."""
    config = trainer.config
    scores = quality.measure(trainer.generated(config.eval_samples, config.eval_steps))
    if run_log is not None:
        run_log.quality(trainer.step, scores.record())
    return trainer.step, scores


def _shared_elapsed(ctx: DistributedContext, elapsed: float, budget_s: float) -> float:
    """With a ``--minutes`` budget under torchrun, rank 0's elapsed time on every rank:
    the ranks must stop at the same step (a rank that stops alone leaves the others
    waiting in the all-reduce) and see the same cosine progress (or their weights part)."""
    if not ctx.distributed or not math.isfinite(budget_s):
        return elapsed
    mine = torch.tensor([elapsed if ctx.is_main else 0.0], dtype=torch.float64)
    return float(all_reduce_sum(mine.to(ctx.device))[0])


def _lr(trainer: DiffusionTrainer) -> float:
    return float(trainer.optimizer.param_groups[0]["lr"])
