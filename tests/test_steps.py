"""The training modes of :mod:`offsite.training.steps`: which one a run gets, and what none combines."""

import pytest

from offsite.core.errors import OffsiteError
from offsite.training import steps


class _Policy:
    def autocast(self):
        return None


@pytest.mark.parametrize("given, mode", [
    ({}, steps.Plain), ({"penalty": lambda: 0.0}, steps.Proximal), ({"group": object()}, steps.Sharded),
    ({"private": object()}, steps.Private),
])
def test_a_run_gets_the_step_of_its_mode(given, mode):
    step = steps.choose(None, {}, _Policy(), None, None, 0, **given)
    assert type(step) is mode
    assert step.keeps_best is (mode is not steps.Private)  # DP-SGD keeps the last weights


@pytest.mark.parametrize("other", [{"group": object()}, {"private": object()}])
def test_a_penalty_combines_with_no_other_mode(other):
    with pytest.raises(OffsiteError, match="loss penalty cannot be combined"):
        steps.choose(None, {}, _Policy(), None, None, 0, penalty=lambda: 0.0, **other)
