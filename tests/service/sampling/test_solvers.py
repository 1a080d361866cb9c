"""The solver registry: its names are the wire's, and what each solver says it
supports is what its plans do."""

from __future__ import annotations

from typing import get_args

import pytest

from clsp_positives.proto.params import ETA_METHODS, Method
from clsp_positives.service.sampling import solvers
from clsp_positives.service.sampling.schedule import sampling_config, sampling_plan
from clsp_positives.service.sampling.solvers import (
    SOLVERS,
    UnsupportedSchedulerError,
    check_registry,
    get_solver,
)
from tests.support.models import scheduler_config


def test_the_registry_is_the_wire_s_methods() -> None:
    assert tuple(SOLVERS) == get_args(Method)
    assert tuple(name for name, s in SOLVERS.items() if s.takes_eta) == ETA_METHODS
    assert all(s.name == name for name, s in SOLVERS.items())


def test_a_drifted_registry_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solvers, "SOLVERS", {k: v for k, v in SOLVERS.items() if k != "ddpm"})
    with pytest.raises(RuntimeError, match=r"proto\.params\.Method"):
        check_registry()
    monkeypatch.setattr(solvers, "SOLVERS", dict(SOLVERS))
    monkeypatch.setattr(solvers, "ETA_METHODS", ("ddim", "ddpm"))
    with pytest.raises(RuntimeError, match="ETA_METHODS"):
        check_registry()


def test_an_unknown_solver_names_the_wire_field() -> None:
    with pytest.raises(UnsupportedSchedulerError, match="method must be one of"):
        get_solver("euler")


@pytest.mark.parametrize("name", list(SOLVERS))
def test_each_solver_does_what_it_says(name: str) -> None:
    solver = SOLVERS[name]
    cfg = sampling_config(scheduler_config(), "authors-clipped")
    plan = sampling_plan(cfg, solver=name, steps=6, eta=0.5)
    assert plan.solver == name
    eta_free = sampling_plan(cfg, solver=name, steps=6, eta=0.0)
    assert (plan != eta_free) is solver.takes_eta
    assert (plan.clip_range is not None) is solver.clips_x0
    at_warmup = sampling_plan(cfg, solver=name, steps=max(solver.warmup_steps, 2))
    assert at_warmup.uses_previous_x0 is solver.reads_previous_x0
    if solver.reads_previous_x0:  # the fewest steps that read it
        fewer = sampling_plan(cfg, solver=name, steps=solver.warmup_steps - 1)
        assert not fewer.uses_previous_x0
