"""Triton kernels against their torch references, under the Triton interpreter on CPU.

``TRITON_INTERPRET=1`` only takes effect for kernels decorated after it is set,
and other test modules may import triton (or our kernels) first in the same
pytest process, so the kernels run in one fresh subprocess with the variable
set; its JSON report is then asserted case by case here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed: no kernels to test")

WORKER = r"""
import json
import torch
torch.set_num_threads(1)
from clsp_positives.service.sampling import kernel_check, kernels, noise, ops, references
from clsp_positives.service.sampling.solvers import StepCoefficients

report = kernel_check.self_check("cpu")

# Kernel noise does not depend on the batch: one sample alone equals itself in a batch.
seeds = torch.tensor([5, 2**63 - 1, 0, 123456789123456789, 42, 7, 11], dtype=torch.int64)
batch = kernels.normal(seeds, 9, (2, 5, 7))
report["kernel_batch_independent"] = all(
    torch.equal(kernels.normal(seeds[i:i + 1], 9, (2, 5, 7))[0], batch[i]) for i in range(7)
)
# A sample spanning several blocks, and the ops front door dispatching to the kernel.
x = torch.randn(2, 1, 40, 41)
report["dispatch_uses_kernels"] = ops.use_kernels(x)
got = ops.noise_anchor(x, seeds[:2], noise.anchor_stream(3), 0.3, 0.95)
report["dispatch_noise_anchor_err"] = float((got - references.noise_anchor_reference(
    x, seeds[:2], noise.anchor_stream(3), 0.3, 0.95)).abs().max())
coefs = StepCoefficients(0.2, 0.9797958971, 0.4, 0.0, 0.6, 0.25)
got = ops.scheduler_update(x, -x, seeds[:2], noise.step_stream(3), coefs, "epsilon", 1.0)
ref = references.scheduler_update_reference(
    x, -x, seeds[:2], noise.step_stream(3), coefs, "epsilon", 1.0
)
report["dispatch_update_err"] = float((got - ref).abs().max())
# A DPM-Solver++ second-order step through the front door: x_prev and the kept x0.
x0_prev = torch.randn(2, 1, 40, 41)
coefs = StepCoefficients(0.2, 0.9797958971, 1.3, 0.0, 0.6, 0.0, -0.4)
got, got_x0 = ops.scheduler_update(
    x, -x, seeds[:2], noise.step_stream(3), coefs, "epsilon", 1.0, x0_prev=x0_prev,
    return_x0=True,
)
ref, ref_x0 = references.scheduler_update_reference(
    x, -x, seeds[:2], noise.step_stream(3), coefs, "epsilon", 1.0, x0_prev=x0_prev,
    return_x0=True,
)
report["dispatch_multistep_err"] = float((got - ref).abs().max())
report["dispatch_multistep_x0_err"] = float((got_x0 - ref_x0).abs().max())
report["multistep_reads_x0_prev"] = float((got - ops.scheduler_update(
    x, -x, seeds[:2], noise.step_stream(3), coefs, "epsilon", 1.0, x0_prev=torch.zeros_like(x)
)).abs().max())
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", CLSP_KERNELS="triton", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT"))
    return json.loads(line.removeprefix("REPORT"))


def test_random_integers_bitwise_equal(report: dict) -> None:
    assert report["ints_equal"] is True


def test_float32_within_1e6(report: dict) -> None:
    fp32 = {k: v for k, v in report.items() if ".float32" in k}
    assert len(fp32) >= 20
    assert {k: v for k, v in fp32.items() if not v <= 1e-6} == {}


def test_half_precision_within_one_output_ulp(report: dict) -> None:
    # The interpreter's float32 -> bfloat16 cast does not round to nearest even
    # (the GPU's does), so half outputs may differ by one ulp of their dtype here.
    half = {k: v for k, v in report.items() if k.endswith("@ulp")}
    assert any(".bfloat16" in k for k in half) and any(".float16" in k for k in half)
    assert {k: v for k, v in half.items() if not v <= 1.0} == {}


def test_every_update_variant_was_checked(report: dict) -> None:
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        for clip in ("None", "1.0"):
            for sigma in ("0.0", "0.3"):
                assert f"update.float32.nchw.{prediction_type}.clip{clip}.sigma{sigma}" in report
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        for clip in ("None", "1.0"):
            for prev in ("0.0", "-0.4"):
                name = f"update_x0.float32.nchw.{prediction_type}.clip{clip}.prev{prev}"
                assert {name, name + ".x0", name + ".no_keep"} <= set(report)
    for op in ("noise_anchor", "update", "update_x0", "lerp"):
        assert any(k.startswith(op + ".") and "channels_last" in k for k in report)


def test_self_check_passes(report: dict) -> None:
    assert report["failures"] == [] and report["ok"] is True


def test_kernel_noise_is_batch_independent(report: dict) -> None:
    assert report["kernel_batch_independent"] is True


def test_ops_dispatch_to_kernels(report: dict) -> None:
    assert report["dispatch_uses_kernels"] is True
    assert report["dispatch_noise_anchor_err"] <= 1e-6
    assert report["dispatch_update_err"] <= 1e-6
    assert report["dispatch_multistep_err"] <= 1e-6
    assert report["dispatch_multistep_x0_err"] <= 1e-6
    # the previous x0 enters the kernel's step: another x0_prev gives another x_prev
    assert report["multistep_reads_x0_prev"] > 0.1


def test_self_check_on_cpu_needs_the_interpreter(monkeypatch) -> None:
    from clsp_positives.service.sampling import kernel_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernel_check.self_check("cpu")
