"""The measurements behind ``clsp calibrate`` and the quality benchmark, and the
calibration's own logic: the grid, the budget, the recommendation, the table and the plot.
Real digits and a real scikit-learn probe; no pool (tests/system/test_calibrate.py has one)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clsp_positives.images import load_images
from clsp_positives.trainer.positive_tools import calibrate as cal
from clsp_positives.trainer.positive_tools.calibrate_plot import label_box, write_plot
from clsp_positives.trainer.positive_tools.quality import (
    Probe,
    between_candidates,
    class_kept,
    diversity,
    fit_probe,
    fraction_all_differ,
    load_features,
    pixels,
    to_anchor,
)


@pytest.fixture(scope="module")
def digits():
    return load_images("digits", split="train"), load_images("digits", split="test")


@pytest.fixture(scope="module")
def probe(digits) -> Probe:
    train, _ = digits
    return fit_probe(train.images, train.labels)


# ------------------------------------------------------------------ class kept


def test_class_kept_of_the_real_images_is_the_probes_accuracy(digits, probe) -> None:
    _, test = digits
    accuracy = probe.classifier.score(pixels(test.images), test.labels)
    assert class_kept(probe, test.images, test.labels) == pytest.approx(accuracy)
    assert accuracy > 0.9  # raw-pixel logistic regression reads digits well
    # k copies of every anchor as its candidates: each counts, each has its anchor's class.
    copies = np.repeat(test.images[:, None], 3, axis=1)
    assert class_kept(probe, copies, test.labels) == pytest.approx(accuracy)
    # Floats in [0, 1] are the same images.
    as_float = test.images.astype(np.float32) / 255.0
    assert class_kept(probe, as_float, test.labels) == pytest.approx(accuracy)


def test_positives_of_another_class_are_not_kept(digits, probe) -> None:
    _, test = digits
    other = test.images[np.argsort(test.labels, kind="stable")]  # classes reordered
    assert class_kept(probe, other, test.labels) < 0.3
    with pytest.raises(ValueError, match="positives for"):
        class_kept(probe, test.images[:5], test.labels[:4])


def test_a_probe_on_features_reads_what_the_extractor_returns(digits) -> None:
    train, test = digits

    def half(images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.uint8  # extractors always get pixels as uint8
        return images.reshape(len(images), -1)[:, ::2].astype(np.float32)

    probe = fit_probe(train.images, train.labels, features=half)
    assert class_kept(probe, test.images, test.labels) > 0.85
    blind = fit_probe(
        train.images, train.labels, features=lambda x: np.zeros((len(x), 3), np.float32)
    )
    assert class_kept(blind, test.images, test.labels) < 0.2  # nothing to read: chance
    broken = Probe(probe.classifier, features=lambda x: x)
    with pytest.raises(ValueError, match=r"must return \[N, D\]"):
        broken.predict(test.images)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_probe(train.images[:5], np.zeros(5, np.int64))


def test_load_features_takes_module_colon_function(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "calib_feats.py").write_text("def embed(x):\n    return x\nvalue = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_features("calib_feats:embed").__name__ == "embed"
    for spec, match in (
        ("calib_feats", "not module:function"),
        ("no_such_module_here:f", "cannot import"),
        ("calib_feats:missing", "has no function"),
        ("calib_feats:value", "has no function"),
    ):
        with pytest.raises(ValueError, match=match):
            load_features(spec)
    sys.modules.pop("calib_feats", None)


# ------------------------------------------------------------------ diversity


def test_identical_candidates_have_no_diversity() -> None:
    anchors = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 1), dtype=np.uint8)
    same = np.repeat(anchors[:, None], 3, axis=1)
    d = diversity(same, anchors)
    assert d.between_candidates == 0.0
    assert d.to_anchor == 0.0 and d.min_to_anchor == 0.0
    assert d.fraction_all_differ == 0.0


def test_diversity_on_known_images() -> None:
    anchors = np.zeros((2, 2, 2, 1), np.uint8)
    candidates = np.stack([np.zeros_like(anchors), np.full_like(anchors, 255)], axis=1)
    d = diversity(candidates, anchors)
    assert d.between_candidates == pytest.approx(1.0)
    assert d.to_anchor == pytest.approx(0.5)  # one candidate at 0, one at 1
    assert d.min_to_anchor == 0.0
    assert d.fraction_all_differ == 1.0
    # Three candidates: anchor 0's last two are equal, so it is not "all differ".
    three = np.concatenate([candidates, candidates[:, 1:]], axis=1)
    three[1, 2] = 128
    assert fraction_all_differ(three) == 0.5
    # Each pair of candidate indices weighs the same. Anchor 0 is [0, 1, 1], anchor 1 is
    # [0, 1, 128/255]: pair (0, 1) differs by 1 in both, (0, 2) by 1 and 128/255, (1, 2) by 0
    # and 127/255, so the pairs' means are 1, (1 + 128/255)/2, (127/255)/2: 2/3 overall.
    assert between_candidates(three) == pytest.approx(2 / 3, abs=1e-6)
    # uint8 and floats in [0, 1] measure alike.
    assert to_anchor(candidates.astype(np.float32) / 255, anchors.astype(np.float32)) == 0.5
    with pytest.raises(ValueError, match="k >= 2"):
        between_candidates(candidates[:, :1])
    with pytest.raises(ValueError, match=r"\[N, k, H, W, C\]"):
        diversity(candidates[0], anchors)


# ------------------------------------------------------------------ the grid


def test_weights_and_steps_are_checked_by_generation_params() -> None:
    assert cal.parse_weights(" 0, 0.1 ,1") == [0.0, 0.1, 1.0]
    assert cal.parse_steps("50,25") == [50, 25]
    for text, match in (
        ("0,1.5", r"--weights: .*less than or equal to 1 \(got 1.5\)"),
        ("-0.1", "--weights: .*greater than or equal to 0"),
        ("nan", "--weights: .*finite"),
        ("a", "--weights: 'a' is not a number"),
        (" , ", "--weights is empty"),
    ):
        with pytest.raises(ValueError, match=match):
            cal.parse_weights(text)
    for text, match in (("0", "--steps: .*greater than or equal to 1"), ("2.5", "whole number")):
        with pytest.raises(ValueError, match=match):
            cal.parse_steps(text)


def test_the_grid_runs_fewest_steps_first() -> None:
    settings = cal.grid([0.5, 0.1, 0.5], [100, 25, 50])
    assert settings == [
        cal.Setting(0.5, 25),
        cal.Setting(0.1, 25),
        cal.Setting(0.5, 50),
        cal.Setting(0.1, 50),
        cal.Setting(0.5, 100),
        cal.Setting(0.1, 100),
    ]
    with pytest.raises(ValueError, match="empty"):
        cal.grid([], [10])


def row(w: float, steps: int, kept: float | None, between: float | None, **extra) -> cal.Row:
    measured = kept is not None
    return cal.Row(
        interpolation_weight=w,
        steps=steps,
        status="measured" if measured else "skipped",
        class_kept=kept,
        between_candidates=between,
        seconds=extra.pop("seconds", 1.0 if measured else None),
        **extra,
    )


def test_recommend_the_most_diverse_setting_that_keeps_the_class() -> None:
    rows = [
        row(0.0, 25, 0.95, 0.10),
        row(0.3, 25, 0.88, 0.25),
        row(0.5, 25, 0.70, 0.40),  # most diverse, but loses the class
        row(0.3, 50, 0.90, 0.25),  # as diverse as w=0.3 at 25 steps: the cheaper one wins
        row(1.0, 100, None, None),  # skipped
    ]
    best = cal.recommend(rows, 0.85)
    assert best is not None and best.reached_target
    assert (best.interpolation_weight, best.steps) == (0.3, 25)
    assert "--interpolation-weight 0.3 --gen-steps 25" in best.text
    assert cal.recommend(rows, 0.6).interpolation_weight == 0.5
    shared = "--gen-sampling authors-clipped --gen-interpolate bottleneck+low-skips"
    assert f"--gen-steps 25 {shared}" in cal.recommend(rows, 0.85, shared_flags=shared).text


def test_when_no_setting_reaches_the_target_the_best_class_kept_is_named() -> None:
    rows = [row(0.1, 25, 0.40, 0.2), row(0.5, 25, 0.62, 0.3), row(1.0, 25, 0.10, 0.5)]
    best = cal.recommend(rows, 0.85, probe_accuracy=0.97)
    assert best is not None and not best.reached_target
    assert (best.interpolation_weight, best.class_kept) == (0.5, 0.62)
    assert best.text.startswith("no setting reached class kept >= 0.85")
    assert "probe itself" not in best.text
    blunt = cal.recommend(rows, 0.85, probe_accuracy=0.7)
    assert "The probe itself is right on only 0.700" in blunt.text
    assert cal.recommend([row(0.1, 25, None, None)], 0.85) is None


def test_the_budget_skips_what_is_left_and_the_first_setting_always_runs() -> None:
    now = [0.0]
    ran: list[cal.Setting] = []
    seen: list[cal.Row] = []

    def measure_one(setting: cal.Setting) -> cal.Row:
        ran.append(setting)
        seconds = setting.steps / 10  # 10 steps a second
        now[0] += seconds
        return row(setting.interpolation_weight, setting.steps, 0.9, 0.1, seconds=seconds)

    settings = cal.grid([0.1, 0.5], [10, 20, 40])
    rows = cal.run_grid(
        settings, measure_one, budget_s=5.0, clock=lambda: now[0], on_row=seen.append
    )
    # 1 + 1 + 2 + 2 = 6 s would pass 5 s: the second 20-step setting is the first skipped.
    assert ran == settings[:3]
    assert [r.status for r in rows] == ["measured"] * 3 + ["skipped"] * 3
    assert [r.setting for r in rows] == settings and seen == rows
    assert "would pass the budget of 5 s" in rows[3].note
    assert "budget of 5 s spent" not in rows[3].note
    now[0] = 0.0
    ran.clear()
    spent = cal.run_grid(settings, measure_one, budget_s=0.0, clock=lambda: now[0])
    assert ran == settings[:1] and spent[1].note == "skipped: budget of 0 s spent"
    now[0] = 0.0
    assert len(cal.run_grid(settings, measure_one, clock=lambda: now[0])) == 6


def test_measure_times_the_fetch_alone(digits, probe) -> None:
    _, test = digits
    anchors, labels = test.images[:10], test.labels[:10]
    ticks = iter([100.0, 102.0])

    def fetch(setting: cal.Setting) -> tuple[np.ndarray, np.ndarray]:
        assert setting == cal.Setting(0.1, 7)
        return np.repeat(anchors[:, None], 2, axis=1), np.ones((10, 2), np.uint8)

    r = cal.measure(cal.Setting(0.1, 7), fetch, probe, anchors, labels, clock=lambda: next(ticks))
    assert (r.positives, r.cache_hits, r.seconds, r.positives_per_s) == (20, 20, 2.0, 10.0)
    assert r.class_kept == class_kept(probe, anchors, labels)
    assert r.between_candidates == 0.0 and r.to_anchor == 0.0


def test_table_marks_the_recommendation_and_says_what_was_skipped() -> None:
    rows = [
        row(0.1, 25, 0.9, 0.2, positives_per_s=12.5),
        row(0.5, 50, None, None, note="skipped: x"),
    ]
    lines = cal.format_table(rows, cal.Setting(0.1, 25)).splitlines()
    assert [c.strip() for c in lines[0].split("|")] == list(cal.TABLE_COLUMNS)
    assert lines[2].split("|")[0].strip() == "*0.1" and "12.5" in lines[2]
    assert lines[3].rstrip().endswith("skipped: x") and " - " in lines[3]


def test_held_out_indices_are_a_fixed_sorted_sample() -> None:
    first = cal.held_out_indices(100, 10)
    assert np.array_equal(first, cal.held_out_indices(100, 10))
    assert np.all(np.diff(first) > 0) and first.max() < 100
    assert first.max() > 50  # across the whole split, not its beginning
    with pytest.raises(ValueError, match="11 images asked for"):
        cal.held_out_indices(10, 11)


# ------------------------------------------------------------------ the plot


def test_the_plot_is_a_png_with_a_point_per_measured_setting(tmp_path: Path) -> None:
    rows = [row(0.1, 25, 0.9, 0.2), row(0.5, 25, 0.5, 0.35), row(1.0, 25, None, None)]
    path = write_plot(
        rows,
        tmp_path / "c.png",
        min_class_kept=0.85,
        probe_accuracy=0.97,
        recommended=cal.Setting(0.1, 25),
    )
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        img.load()
        pixels_rgb = np.asarray(img.convert("RGB"))
    assert img.format == "PNG" and img.size == (720, 520)
    # The recommended point is drawn in its own colour; the other one in black.
    assert (np.abs(pixels_rgb.astype(int) - (200, 60, 40)).sum(axis=2) == 0).sum() > 20
    empty = write_plot([], tmp_path / "none.png", min_class_kept=0.85)
    assert empty.stat().st_size > 0


def test_labels_of_close_points_do_not_overlap() -> None:
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(4):
        placed.append(label_box(100, 100, 60, placed))
    for i, a in enumerate(placed):
        for b in placed[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    # Near the right edge the label goes left of the point.
    assert label_box(700, 100, 60, [], right_edge=720)[2] < 700
