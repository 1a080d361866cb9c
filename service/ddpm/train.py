"""DDPM training: the unconditional pixel-space models the CLSP sampler draws positives from.

Epsilon prediction on uniformly drawn timesteps of the model's own scheduler (linear betas
1e-4..0.02, T=1000 by default), AdamW with warm-up and gradient clipping, and an EMA copy of the
weights: the EMA copy is what gets saved and sampled, since it gives much cleaner samples than
the raw weights after a short run.

``--out`` holds the DDPM pipeline layout (``unet/`` with the EMA weights, ``scheduler/``), the
training state (``train_state.pt``: raw weights, EMA, optimizer, step, data order, RNG) so that
a second run with the same ``--out`` resumes where the first stopped, ``samples.png``, and the
run's log: ``metrics.jsonl``, ``curves.png`` and with ``--tensorboard`` ``tensorboard/``
(service/ddpm/tracking.py).
"""

from __future__ import annotations

import copy
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
from clsp_positives.proto.keys import unit_to_uint8
from clsp_positives.service.ddpm.config import COMMAND, DiffusionTrainConfig
from clsp_positives.service.ddpm.tracking import DiffusionLog, check_tracking

if TYPE_CHECKING:
    from clsp_positives.service.ddpm.latents import LatentData

STATE_FILE = "train_state.pt"
SAMPLES_FILE = "samples.png"
STATE_VERSION = 1


@dataclass(frozen=True)
class TrainResult:
    out: Path
    step: int
    start_step: int
    loss: float  # mean loss over the last logging window (~2 s)
    images_per_s: float
    seconds: float
    parameters: int


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
    """Epoch-wise random permutations drawn from one generator; its position is checkpointed."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        if n < 1:
            raise ValueError("the data set is empty")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.generator = generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["perm"]) != self.n:
            raise ValueError("the saved data order is for a data set of another size")
        self.perm, self.pos = state["perm"], int(state["pos"])


# ---------------------------------------------------------------- training


class DiffusionTrainer:
    """One DDPM training run: state, a step, checkpoints and a sample grid."""

    def __init__(self, config: DiffusionTrainConfig) -> None:
        from diffusers import DDPMScheduler

        from clsp_positives.images import load_images
        from clsp_positives.service.ddpm import presets

        self.config = config
        self.out = Path(config.out)
        if config.threads:
            torch.set_num_threads(config.threads)
        data = load_images(
            config.dataset,
            split="train",
            size=config.image_size,
            channels=config.channels,
            root=config.data_root,
            download=config.download,
        )
        self.data_name = data.name
        self.device = torch.device(config.device)
        images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()  # uint8
        self.images = images.to(self.device)
        self.image_size, self.image_channels = data.size, data.channels
        # What the UNet sees: the pictures, or with --vae their latents (docs/latent.md).
        self.sample_size, self.channels = data.size, data.channels
        self.autoencoder = None
        self.latents: LatentData | None = None
        if config.vae:
            from clsp_positives.service.ddpm.latents import encode_data_set
            from clsp_positives.service.sampling.model import load_autoencoder

            self.autoencoder = load_autoencoder(config.vae).to(self.device)
            self.latents = encode_data_set(
                self.autoencoder, self.images, flips=config.use_flip, progress=config.progress
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

        torch.manual_seed(config.seed)
        self.unet = build_unet(self.unet_config).to(self.device)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.order = BatchOrder(len(self.images), config.batch_size, self.generator)
        self.step = 0
        if state is not None:
            # Loaded onto the CPU; load_state_dict copies into the device tensors.
            self.unet.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            self.order.load_state_dict(state["order"])
            torch.set_rng_state(state["torch_rng"])
            self.step = int(state["step"])
        self.start_step = self.step
        self.parameters = sum(p.numel() for p in self.unet.parameters())

    # -- state

    def _load_state(self) -> dict[str, Any] | None:
        path = self.out / STATE_FILE
        if not path.is_file():
            return None
        # Tensors, numbers, strings and plain containers only: no pickled objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") != STATE_VERSION:
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
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "model": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "order": self.order.state_dict(),
            "unet_config": self.unet_config,
            "scheduler_config": self.scheduler_config,
            "data": self._data_identity(),
            "batch_size": self.config.batch_size,
            "seed": self.config.seed,
        }

    def save(self) -> None:
        """EMA weights in the pipeline layout, then the state (each written atomically)."""
        from clsp_positives.service.ddpm import presets

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

    # -- training

    def batch(self) -> torch.Tensor:
        idx = self.order.next().to(self.device)
        if self.latents is not None:
            return self.latents.batch(idx, self.generator if self.config.use_flip else None)
        x = self.images[idx].to(torch.float32).div_(127.5).sub_(1.0)
        if self.config.use_flip:
            flip = (torch.rand(len(x), generator=self.generator) < 0.5).to(self.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def train_step(self, progress: float) -> torch.Tensor:
        """One optimizer step; returns the loss tensor (not synced, so GPUs run ahead)."""
        x0 = self.batch()
        n = len(x0)
        # All training randomness comes from one CPU generator, so resume and devices agree.
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        t = t.to(self.device)
        xt = self.sqrt_ab[t].view(n, 1, 1, 1) * x0 + self.sqrt_1mab[t].view(n, 1, 1, 1) * noise
        pred = self.unet(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.config, self.step, progress)
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


def _progress_bar(config: DiffusionTrainConfig, start: int) -> Any:
    from tqdm.auto import tqdm

    total = config.steps if config.steps is not None else None
    return tqdm(
        total=total,
        initial=start,
        disable=not config.progress,
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
) -> TrainResult:
    """Train until ``steps`` (total) or ``minutes`` (this run), whichever comes first.

    ``clock`` measures the ``minutes`` budget (wall time by default); a benchmark on a shared
    machine can pass process CPU time instead so that other load does not shrink its budget.
    Before the first step the resolved configuration goes to ``--out``'s ``config.yaml``
    and, with the file's path, to ``on_start`` (the command prints it).
    """
    check_tracking(config.tensorboard)
    trainer = DiffusionTrainer(config)
    resolved = config.resolved(trainer.image_size, trainer.image_channels)
    written = write_config_file(
        trainer.out / RUN_CONFIG_NAME, resolved.model_dump(mode="json"), command=COMMAND
    )
    if on_start is not None:
        on_start(resolved, written)
    run_log = DiffusionLog(trainer.out, tensorboard=config.tensorboard, start_step=trainer.step)
    budget_s = config.minutes * 60.0 if config.minutes is not None else math.inf
    t0 = clock()
    window_loss: list[torch.Tensor] = []
    last_loss = float("nan")
    window_t, window_n = t0, 0
    ips = 0.0
    bar = _progress_bar(config, trainer.step)
    try:
        trainer.unet.train()
        for _ in _steps_until(trainer, config, clock, t0, budget_s):
            elapsed = clock() - t0
            progress = max(
                trainer.step / config.steps if config.steps else 0.0,
                elapsed / budget_s if math.isfinite(budget_s) else 0.0,
            )
            window_loss.append(trainer.train_step(progress))
            window_n += trainer.order.batch_size
            if on_step is not None:
                on_step(trainer.step, float(window_loss[-1]))
            now = clock()
            if now - window_t >= 2.0 or trainer.step == config.steps:
                last_loss = float(torch.stack(window_loss).mean())
                ips = window_n / max(now - window_t, 1e-9)
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.0f}")
                run_log.window(trainer.step, last_loss, _lr(trainer), ips)
                window_t, window_n, window_loss = now, 0, []
            bar.update(1)
            if trainer.step % config.save_every == 0:
                trainer.save()
                if run_log.wants_samples:
                    run_log.samples(trainer.step, trainer.sample_grid())
    except BaseException:
        run_log.close()
        raise
    finally:
        bar.close()
    if window_loss:
        last_loss = float(torch.stack(window_loss).mean())
        run_log.window(
            trainer.step, last_loss, _lr(trainer), window_n / max(clock() - window_t, 1e-9)
        )
    seconds = clock() - t0
    if ips == 0.0 and seconds > 0:
        ips = (trainer.step - trainer.start_step) * trainer.order.batch_size / seconds
    trainer.save()
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
    )


def _lr(trainer: DiffusionTrainer) -> float:
    return float(trainer.optimizer.param_groups[0]["lr"])


def _steps_until(
    trainer: DiffusionTrainer,
    config: DiffusionTrainConfig,
    clock: Callable[[], float],
    t0: float,
    budget_s: float,
) -> Iterator[None]:
    while config.steps is None or trainer.step < config.steps:
        if clock() - t0 >= budget_s:
            return
        yield None
