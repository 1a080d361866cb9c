"""``clsp diffusion train`` at scale (docs/training.md, "Training the DDPM at scale"): two
real torchrun ranks over gloo write one model, laid out as a one-process run's, that the
service loads; a run killed by SIGKILL after a checkpoint resumes bit for bit at the same
world size and is refused at another; ``--precision`` runs where it is native and is
refused where it would be emulated; ``--data-workers`` streams a folder into the very
steps the in-memory set gives."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clsp_positives.cli import app
from clsp_positives.service.ddpm.train import (
    STATE_FILE,
    DiffusionTrainConfig,
    precision_dtype,
    train,
)

REPO = Path(__file__).resolve().parents[3]
STEPS = 6
ARGS = [
    "--preset", "tiny", "--batch-size", "16", "--threads", "1", "--no-progress",
    "--sample-count", "4", "--sample-steps", "2", "--lr-warmup", "2", "--save-every", "2",
    "--no-calibrate",  # tests/service/ddpm/test_train.py covers it; it serves the model
]  # fmt: skip


def _torchrun(out: Path, *args: str, ranks: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(ranks), "-m", "clsp_positives.cli", "diffusion", "train", "--out", str(out),
        *ARGS, *args,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run_ranks(out: Path, *args: str, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _torchrun(out, *args, ranks=ranks),
        cwd=out.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _state(out: Path) -> dict:
    return torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)


def _files(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def _assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs"


def _kill_with_ranks(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL torchrun and the ranks it started (each in a session of its own, so a
    process-group kill would miss them), as a crashed node loses them."""
    import psutil

    ranks = psutil.Process(proc.pid).children(recursive=True)
    for victim in [proc.pid, *(rank.pid for rank in ranks)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(ranks, timeout=30)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted 2-rank run of STEPS steps, and what it printed."""
    out = tmp_path_factory.mktemp("ddp") / "straight"
    done = _run_ranks(out, "--steps", str(STEPS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.slow
def test_two_ranks_write_one_model_that_loads_laid_out_as_one_process_writes(
    two_ranks: tuple[Path, str], tmp_path: Path
) -> None:
    from clsp_positives.service.sampling.generator import PositivesGenerator
    from clsp_positives.service.sampling.model import load_model

    out, stdout = two_ranks
    assert stdout.count(f"trained to step {STEPS}") == 1, stdout  # rank 0 reports, alone
    state = _state(out)
    assert (state["step"], state["world_size"]) == (STEPS, 2)
    # One writer: a second rank appending to the log would add its own start record.
    starts = [line for line in (out / "metrics.jsonl").read_text().splitlines() if "start" in line]
    assert len(starts) == 1
    generator = PositivesGenerator.from_dir(out)
    assert (generator.sample_size, generator.channels) == (16, 1)
    for name, value in load_model(out).unet.state_dict().items():
        assert torch.equal(value, state["ema"][name]), name  # the EMA is the model

    single = tmp_path / "single"
    result = CliRunner().invoke(
        app, ["diffusion", "train", "--out", str(single), *ARGS, "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    assert _files(out) == _files(single)
    assert _state(single)["world_size"] == 1


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes_bit_for_bit(
    two_ranks: tuple[Path, str], tmp_path: Path
) -> None:
    """SIGKILL to torchrun and both ranks once the first checkpoint is on disk; the
    resumed run to STEPS equals the uninterrupted one in its raw weights and its EMA.
    (The killed run asks for more steps: with the constant schedule nothing else of it
    depends on the total.)"""
    straight, _ = two_ranks
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _torchrun(out, "--steps", "1000"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not (out / STATE_FILE).is_file():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.02)
    finally:
        _kill_with_ranks(proc)
    killed_at = _state(out)["step"]
    assert killed_at % 2 == 0 and 2 <= killed_at < STEPS, killed_at

    done = _run_ranks(out, "--steps", str(STEPS))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"trained to step {STEPS} (resumed at step {killed_at})" in done.stdout
    _assert_same_weights(_state(straight), _state(out))


@pytest.mark.slow
def test_resuming_at_another_world_size_is_refused_naming_both(
    two_ranks: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(two_ranks[0], out)
    before = _state(out)
    result = CliRunner().invoke(
        app, ["diffusion", "train", "--out", str(out), *ARGS, "--steps", str(STEPS + 2)]
    )
    assert result.exit_code == 2
    assert "trained on 2 rank(s)" in result.output and "this run has 1" in result.output
    _assert_same_weights(before, _state(out))  # nothing trained, nothing overwritten


@pytest.mark.slow
def test_a_global_batch_the_ranks_cannot_share_evenly_is_refused(tmp_path: Path) -> None:
    done = _run_ranks(tmp_path / "odd", "--steps", "1", "--batch-size", "15")
    assert done.returncode != 0
    assert "--batch-size 15" in done.stderr and "2 ranks" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "odd" / STATE_FILE).exists()


# ---------------------------------------------------------------- precision


def _config(out: Path, steps: int = 3, **kw: object) -> DiffusionTrainConfig:
    return DiffusionTrainConfig(
        out=str(out),
        preset="tiny",
        steps=steps,
        batch_size=8,
        threads=1,
        progress=False,
        sample_count=0,
        lr_warmup=2,
        calibrate=False,
        **kw,
    )


def test_bf16_trains_on_a_cpu_with_native_bf16_and_keeps_fp32_state(tmp_path: Path) -> None:
    from clsp_positives.service.sampling.generator import cpu_has_bf16

    if not cpu_has_bf16():
        with pytest.raises(ValueError, match="--precision bf16 on this CPU would be emulated"):
            train(_config(tmp_path / "bf16", precision="bf16"))
        return
    train(_config(tmp_path / "fp32"))
    train(_config(tmp_path / "bf16", precision="bf16"))
    low, full = _state(tmp_path / "bf16"), _state(tmp_path / "fp32")
    assert low["precision"] == "bf16"
    assert {v.dtype for v in low["ema"].values()} == {torch.float32}
    moments = [s["exp_avg"] for s in low["optimizer"]["state"].values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    # Autocast took effect: the same steps in bf16 arithmetic land on other weights.
    assert any(not torch.equal(v, full["model"][k]) for k, v in low["model"].items())


def test_precisions_that_would_be_emulated_are_refused() -> None:
    cpu = torch.device("cpu")
    assert precision_dtype("fp32", cpu) is None
    assert precision_dtype("bf16", cpu, cpu_bf16=True) == torch.bfloat16
    with pytest.raises(ValueError, match=r"would be emulated.*--precision fp32"):
        precision_dtype("bf16", cpu, cpu_bf16=False)
    with pytest.raises(ValueError, match="--precision fp16 runs on CUDA only"):
        precision_dtype("fp16", cpu)


def test_fp16_on_the_cpu_is_refused_by_the_command(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path), *ARGS, "--steps", "1", "--precision", "fp16"]
    result = CliRunner().invoke(app, ["diffusion", "train", *args])
    assert result.exit_code == 2
    assert "--precision fp16 runs on CUDA only" in result.output
    assert not (tmp_path / STATE_FILE).exists()


# ---------------------------------------------------------------- streamed data


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 RGB PNGs of 20x20 in 3 class folders."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(36):
        d = root / f"class-{i % 3}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_a_streamed_folder_trains_the_steps_the_in_memory_set_gives(
    folder: Path, tmp_path: Path
) -> None:
    """Same images, same order, same flips: DataLoader workers decode what the
    in-memory load holds, so the runs end on the same weights, bit for bit."""
    data = {"dataset": str(folder), "image_size": 16, "flip": True}
    train(_config(tmp_path / "memory", **data))
    train(_config(tmp_path / "streamed", data_workers=2, **data))
    memory, streamed = _state(tmp_path / "memory"), _state(tmp_path / "streamed")
    assert memory["data"] == streamed["data"]
    _assert_same_weights(memory, streamed)
    # and a streamed run resumes: it reads from the saved step on
    result = train(_config(tmp_path / "streamed", 5, data_workers=2, **data))
    assert (result.start_step, result.step) == (3, 5)


def test_what_cannot_be_streamed_says_why(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--image-size"):
        train(_config(tmp_path / "a", dataset=str(folder), data_workers=1))
    with pytest.raises(ValueError, match="image folder"):
        train(_config(tmp_path / "b", dataset="digits", data_workers=1))
    with pytest.raises(ValueError, match=r"--vae.*--data-workers 0"):
        train(
            _config(
                tmp_path / "c", dataset=str(folder), image_size=16, data_workers=1, vae="unused"
            )
        )
