"""``clsp calibrate``'s logic: which interpolation weight and step count to train with.

The interpolation weight w trades the two things a positive must do (docs/design.md §1):
keep the anchor's class (small w: more of the anchor's bottleneck) and differ from the
anchor and from the anchor's other candidates (large w: more of the candidate's own
trajectory). Which w strikes the balance depends on the data set and the model, and a
wrong guess costs a whole training run to find out. Calibration measures the trade-off
directly on held-out labelled images in minutes: for each setting (w, steps) of a grid
it asks the pool for k candidates of every anchor, and measures class kept (a probe fit
on the training split) and diversity (trainer/positive_tools/quality.py).

The grid runs cheapest first (fewest steps first), so a time budget that runs out skips
the expensive settings, not the cheap ones. The recommendation is the most diverse
setting that keeps the class at least ``min_class_kept`` of the time.

Everything here but ``pool_fetch`` is pure: the command
(trainer/positive_tools/calibrate_cli.py) does the I/O. No torch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ValidationError

from clsp_positives.proto.params import GenerationParams
from clsp_positives.trainer.positive_tools.quality import Probe, class_kept, diversity

RESULTS_NAME = "calibration.json"
PLOT_NAME = "calibration.png"
ANCHOR_SEED = 0
"""Seed of the held-out anchors' draw: the same anchors on every run, so two calibrations
of one data set (another model, another grid) compare the same images."""


class Setting(NamedTuple):
    """One point of the grid."""

    interpolation_weight: float
    steps: int


def _items(text: str, option: str, example: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{option} is empty: give a comma-separated list, e.g. {example}")
    return items


def _checked(option: str, field: str, value: Any) -> Any:
    """``value`` as ``GenerationParams`` takes it, or ValueError naming the option: the
    bounds are the params' own, never restated here."""
    try:
        params = GenerationParams.model_validate({field: value})
    except ValidationError as exc:
        reason = "; ".join(e["msg"] for e in exc.errors(include_url=False))
        raise ValueError(f"{option}: {reason} (got {value!r})") from None
    return getattr(params, field)


def _parse(text: str, option: str, field: str, convert: type, what: str, example: str) -> list[Any]:
    """A comma list of ``GenerationParams.<field>`` values, each converted and checked."""
    out = []
    for item in _items(text, option, example):
        try:
            value = convert(item)
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not {what}") from None
        out.append(_checked(option, field, value))
    return out


def parse_weights(text: str, option: str = "--weights") -> list[float]:
    """``"0,0.1,1"`` -> ``[0.0, 0.1, 1.0]``; each must be a valid interpolation weight."""
    return _parse(text, option, "interpolation_weight", float, "a number", "0,0.1,0.5")


def parse_steps(text: str, option: str = "--steps") -> list[int]:
    """``"25,50"`` -> ``[25, 50]``; each must be a valid step count."""
    return _parse(text, option, "steps", int, "a whole number", "25,50,100")


def grid(weights: Iterable[float], steps: Iterable[int]) -> list[Setting]:
    """Every (w, steps), fewest steps first (the cheapest settings run before a budget
    runs out), the weights in the order given; duplicates once."""
    ws = list(dict.fromkeys(float(w) for w in weights))
    ss = sorted(set(int(s) for s in steps))
    if not ws or not ss:
        raise ValueError("the grid is empty: give at least one weight and one step count")
    return [Setting(w, s) for s in ss for w in ws]


class Row(BaseModel):
    """One setting's measurements; the measured fields are None when it was skipped."""

    interpolation_weight: float
    steps: int
    status: Literal["measured", "skipped"]
    note: str = ""
    class_kept: float | None = None
    between_candidates: float | None = None
    to_anchor: float | None = None
    min_to_anchor: float | None = None
    fraction_all_differ: float | None = None
    positives: int | None = None
    cache_hits: int | None = None
    seconds: float | None = None
    positives_per_s: float | None = None

    @property
    def setting(self) -> Setting:
        return Setting(self.interpolation_weight, self.steps)


Fetch = Callable[[Setting], tuple[np.ndarray, np.ndarray]]
"""A setting -> (candidates uint8 [N, k, H, W, C], cache hits [N, k]) for the anchors."""


def measure(
    setting: Setting,
    fetch: Fetch,
    probe: Probe,
    anchors: np.ndarray,
    labels: np.ndarray,
    clock: Callable[[], float] = time.perf_counter,
) -> Row:
    """Fetch one setting's candidates, timed, and measure them. Positives per second is
    the wall time of the fetch alone: what the pool delivers, not what the probe costs."""
    start = clock()
    candidates, hits = fetch(setting)
    seconds = clock() - start
    d = diversity(candidates, anchors)
    count = int(candidates.shape[0] * candidates.shape[1])
    return Row(
        interpolation_weight=setting.interpolation_weight,
        steps=setting.steps,
        status="measured",
        class_kept=class_kept(probe, candidates, labels),
        between_candidates=d.between_candidates,
        to_anchor=d.to_anchor,
        min_to_anchor=d.min_to_anchor,
        fraction_all_differ=d.fraction_all_differ,
        positives=count,
        cache_hits=int(np.asarray(hits).sum()),
        seconds=seconds,
        positives_per_s=count / seconds if seconds > 0 else None,
    )


def estimate_seconds(setting: Setting, measured: Sequence[Row]) -> float | None:
    """How long ``setting`` should take, from the slowest seconds-per-step measured so far
    (every setting samples the same anchors and k, so time grows with the steps)."""
    rates = [r.seconds / r.steps for r in measured if r.seconds is not None]
    return max(rates) * setting.steps if rates else None


def skip_reason(
    setting: Setting, measured: Sequence[Row], elapsed: float, budget_s: float | None
) -> str | None:
    """Why ``setting`` is skipped under the budget, or None to run it. The first setting
    always runs: with nothing measured there is no estimate, and no table either."""
    if budget_s is None or not measured:
        return None
    if elapsed >= budget_s:
        return f"skipped: budget of {budget_s:g} s spent"
    estimate = estimate_seconds(setting, measured)
    if estimate is not None and elapsed + estimate > budget_s:
        return f"skipped: ~{estimate:.1f} s more would pass the budget of {budget_s:g} s"
    return None


def run_grid(
    settings: Sequence[Setting],
    measure_one: Callable[[Setting], Row],
    *,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Measure each setting in order until the budget is spent; the rest become skipped
    rows, so the table still lists the whole grid. ``on_row`` sees every row as it comes."""
    start = clock()
    rows: list[Row] = []
    for setting in settings:
        measured = [r for r in rows if r.status == "measured"]
        reason = skip_reason(setting, measured, clock() - start, budget_s)
        if reason is None:
            row = measure_one(setting)
        else:
            row = Row(
                interpolation_weight=setting.interpolation_weight,
                steps=setting.steps,
                status="skipped",
                note=reason,
            )
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


class Recommendation(BaseModel):
    interpolation_weight: float
    steps: int
    class_kept: float
    between_candidates: float
    reached_target: bool
    min_class_kept: float
    text: str

    @property
    def setting(self) -> Setting:
        return Setting(self.interpolation_weight, self.steps)


def recommend(
    rows: Sequence[Row],
    min_class_kept: float,
    probe_accuracy: float | None = None,
    shared_flags: str = "",
) -> Recommendation | None:
    """Among the measured settings whose class kept reaches ``min_class_kept``, the one
    whose candidates differ most from each other (ties: fewer steps, then more class kept);
    when none reaches it, the one that keeps the class best, and the text says so. None
    when nothing was measured. ``shared_flags``: the ``clsp train`` flags every setting
    was measured with (sampling mode, interpolation), repeated in the advice."""
    measured = [r for r in rows if r.status == "measured" and r.class_kept is not None]
    if not measured:
        return None
    good = [r for r in measured if r.class_kept >= min_class_kept]  # type: ignore[operator]
    if good:
        best = max(good, key=lambda r: (r.between_candidates, -r.steps, r.class_kept))
    else:
        best = max(measured, key=lambda r: (r.class_kept, r.between_candidates, -r.steps))
    flags = f"--interpolation-weight {best.interpolation_weight:g} --gen-steps {best.steps}"
    flags += f" {shared_flags}" if shared_flags else ""
    summary = (
        f"w = {best.interpolation_weight:g}, {best.steps} steps: class kept "
        f"{best.class_kept:.3f}, between candidates {best.between_candidates:.3f}"
    )
    if good:
        text = (
            f"recommended: {summary} (the most diverse of {len(good)} setting(s) keeping the "
            f"class >= {min_class_kept:g}); clsp train {flags}"
        )
    else:
        text = (
            f"no setting reached class kept >= {min_class_kept:g}; the best was {summary} "
            f"(clsp train {flags})."
        )
        if probe_accuracy is not None and probe_accuracy < min_class_kept:
            text += (
                f" The probe itself is right on only {probe_accuracy:.3f} of the real held-out "
                "images, so positives will hardly reach the target: lower --min-class-kept, or "
                "give --features a better extractor."
            )
        else:
            text += (
                " Smaller weights and more steps keep more of the class, so does a model trained"
                " longer; for small models --gen-sampling authors-clipped and"
                " --gen-interpolate bottleneck+low-skips (docs/method.md)."
            )
    return Recommendation(
        interpolation_weight=best.interpolation_weight,
        steps=best.steps,
        class_kept=float(best.class_kept),  # type: ignore[arg-type]
        between_candidates=float(best.between_candidates),  # type: ignore[arg-type]
        reached_target=bool(good),
        min_class_kept=min_class_kept,
        text=text,
    )


TABLE_COLUMNS = ("w", "steps", "class kept", "between cands", "to anchor", "positives/s")


def format_table(rows: Sequence[Row], recommended: Setting | None = None) -> str:
    """The rows as a plain-text table; ``*`` marks the recommended setting."""
    lines = [" | ".join(f"{c:>13}" for c in TABLE_COLUMNS)]
    lines.append("-+-".join("-" * 13 for _ in TABLE_COLUMNS))

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        mark = "*" if recommended is not None and r.setting == recommended else " "
        cells = [
            f"{mark}{r.interpolation_weight:g}",
            str(r.steps),
            num(r.class_kept, ".3f"),
            num(r.between_candidates, ".3f"),
            num(r.to_anchor, ".3f"),
            num(r.positives_per_s, ".1f"),
        ]
        line = " | ".join(f"{c:>13}" for c in cells)
        lines.append(f"{line}   {r.note}" if r.note else line)
    return "\n".join(lines)


def held_out_indices(count: int, wanted: int, seed: int = ANCHOR_SEED) -> np.ndarray:
    """``wanted`` of ``count`` indices drawn without replacement, in index order: a
    sample across the whole split (a folder's images come class by class, so the first N
    would all be one class)."""
    if wanted > count:
        raise ValueError(f"{wanted} images asked for, the split holds {count}")
    return np.sort(np.random.default_rng(seed).choice(count, wanted, replace=False))


def pool_fetch(client: Any, anchors: np.ndarray, base: GenerationParams, batch_size: int) -> Fetch:
    """A ``Fetch`` through a ``PoolClient``: ``anchors`` in requests of ``batch_size``, all
    in flight at once (the generators batch them together), with ``base``'s params but
    the setting's weight and steps."""

    def fetch(setting: Setting) -> tuple[np.ndarray, np.ndarray]:
        # The weight and steps were checked against GenerationParams by the parsers.
        params = base.model_copy(
            update={"interpolation_weight": setting.interpolation_weight, "steps": setting.steps}
        )
        futures = [
            client.submit(anchors[i : i + batch_size], None, params)
            for i in range(0, len(anchors), batch_size)
        ]
        try:
            answers = [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
        positives = np.concatenate([a.positives for a in answers])
        hits = np.concatenate([a.cache_hit for a in answers])
        return positives, hits

    return fetch


def results(
    *,
    rows: Sequence[Row],
    recommendation: Recommendation | None,
    probe_accuracy: float,
    model: dict[str, Any],
    sampling: str,
    run: dict[str, Any],
    complete: bool,
) -> dict[str, Any]:
    """What ``calibration.json`` holds."""
    return {
        "command": "clsp calibrate",
        "complete": complete,
        "run": run,
        "model": model,
        "sampling": sampling,
        "probe_accuracy": probe_accuracy,
        "rows": [r.model_dump() for r in rows],
        "recommendation": None if recommendation is None else recommendation.model_dump(),
    }


def write_results(out: Path, payload: dict[str, Any]) -> Path:
    """``out/calibration.json``, replaced whole (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    return path
