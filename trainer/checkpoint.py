"""Training checkpoints: everything ``--resume`` needs to continue as if the
run had never stopped (model with its queue or support set, optimizer, LR
schedule, epoch, RNG states, the model fingerprint its positives were pinned to)
plus the run's config, so ``clsp eval`` can rebuild the backbone from the file alone.

Runs are shared between people, so loading one must never run code: a
checkpoint holds only tensors and plain containers (the RNG states as lists
and tensors, the config as a JSON string) and is read with
``torch.load(weights_only=True)``, whose unpickler refuses every other object.
Files of the first format held NumPy arrays, which that loader refuses; they
are refused with the command that converts them (``clsp checkpoint convert``,
which admits NumPy's array constructor and nothing else). docs/reliability.md §4
lists the threat and the tests.
"""

from __future__ import annotations

import json
import os
import pickle  # only for the error class torch raises; nothing here unpickles with it
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 2
OLD_FORMAT_VERSION = 1
PINNED_MODEL = "positives_model"
"""The key of the model fingerprint the run's positives came from (the pool's pinned
model, an offline bank's; None: not known). A resumed run pins it again, so it never
trains on positives of two models (docs/reliability.md, "Model pinning"); files written
before the key existed load without it and pin at their first positives."""


class UnsafeCheckpoint(ValueError):
    """A file that cannot be read without running code its pickle names."""


def _numpy_array_globals() -> list[Any]:
    """What a format-1 file needs beyond tensors: NumPy's array constructor, the
    array type and dtypes (the legacy NumPy RNG state is a uint32 array)."""
    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed numpy.core
    reconstruct = core.multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _global_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


OLD_FORMAT_GLOBALS = frozenset(_global_name(g) for g in _numpy_array_globals())
"""The globals a format-1 checkpoint names; anything else is not one we wrote."""


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and plain lists (no NumPy arrays,
    no tuples that only a full unpickler would rebuild)."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": str(name),
            "key": [int(v) for v in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["bit_generator"],
            np.asarray(n["key"], dtype=np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    # map_location may have moved them; the generators want CPU byte tensors.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename): a crash mid-write never leaves a
    truncated checkpoint where the last good one was. ``state["config"]`` (a
    dict of plain values) is stored as JSON; the rest must be tensors and plain
    containers, which is checked here so that a file that could not be loaded
    back is never written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {"format": FORMAT_VERSION, **state}
    if "config" in stored:
        stored["config"] = json.dumps(stored["config"], sort_keys=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(stored, tmp)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
    if unsafe:
        tmp.unlink()
        raise TypeError(f"a checkpoint may hold only tensors and plain containers, not {unsafe}")
    os.replace(tmp, path)
    return path


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return path


def _refusal(path: Path) -> UnsafeCheckpoint:
    """Why ``path`` is refused: listing its globals reads the pickle without running it."""
    try:
        needs = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not even a torch zip file
        needs = set()
    if needs and needs <= OLD_FORMAT_GLOBALS:
        return UnsafeCheckpoint(
            f"{path} is a clsp checkpoint of format {OLD_FORMAT_VERSION}, which kept NumPy "
            "objects that only a full unpickler restores; it was not loaded. If you trust "
            f"the file, convert it once with: clsp checkpoint convert {path}"
        )
    named = f" (it names {', '.join(sorted(needs))})" if needs else ""
    return UnsafeCheckpoint(
        f"{path} is not a clsp training checkpoint: it cannot be loaded without running "
        f"code from the file{named}, so it was refused unread"
    )


def _checked(path: Path, state: Any, version: int) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != version:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path} is not a clsp training checkpoint of format {version} (found {found!r})"
        )
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint``; a directory means its
    ``checkpoint.pt``. Never runs code from the file: anything beyond tensors and
    plain containers is refused (``UnsafeCheckpoint``, a ValueError)."""
    path = _resolve(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise _refusal(path) from None
    except RuntimeError as exc:  # not a torch file at all, or a truncated one
        raise ValueError(f"{path} is not a readable clsp training checkpoint: {exc}") from None
    state = _checked(path, state, FORMAT_VERSION)
    if not isinstance(state.get("config"), str):
        raise ValueError(f"{path}: the config of a checkpoint is JSON text")
    return {**state, "config": json.loads(state["config"])}


def _legacy_rng(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 RNG state (tuples and a NumPy array) in today's plain form."""
    version, internal, gauss = state["python"]
    name, key, pos, has_gauss, cached = state["numpy"]
    plain: dict[str, Any] = {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": {
            "bit_generator": str(name),
            "key": [int(v) for v in np.asarray(key)],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": state["torch"],
    }
    if "cuda" in state:
        plain["cuda"] = list(state["cuda"])
    return plain


def convert_checkpoint(src: str | Path, dst: str | Path | None = None) -> Path:
    """Rewrite a format-1 checkpoint in the current format (``clsp checkpoint
    convert``). The old file is read with ``weights_only=True`` plus NumPy's array
    constructor and nothing else, so even a hostile file cannot run code here;
    without ``dst`` the file is replaced and the original kept as ``*.format1``."""
    src = _resolve(src)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            old = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _refusal_to_convert(src) from None
    if isinstance(old, dict) and old.get("format") == FORMAT_VERSION:
        raise ValueError(f"{src} is already of format {FORMAT_VERSION}; nothing to convert")
    old = _checked(src, old, OLD_FORMAT_VERSION)
    state = {k: v for k, v in old.items() if k != "format"}
    state["rng"] = [_legacy_rng(r) for r in old["rng"]]
    target = Path(dst) if dst is not None else src
    if target.is_dir():
        target = target / CHECKPOINT_NAME
    if target == src:
        os.replace(src, src.with_name(src.name + ".format1"))
    return save_checkpoint(target, state)


def _refusal_to_convert(path: Path) -> UnsafeCheckpoint:
    needs = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - OLD_FORMAT_GLOBALS
    return UnsafeCheckpoint(
        f"{path} is not a clsp checkpoint that can be converted: it names "
        f"{', '.join(sorted(needs)) or 'objects'} beyond what clsp wrote, so it was refused unread"
    )
