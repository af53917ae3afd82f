"""The trainer's up-front memory check: params + optimizer state + gradients, plus one step's activations once
the state alone takes over a quarter of a device."""

import pytest

from sqattn import configs
from sqattn.train import dryrun, trainer
from sqattn.train import state as state_lib


@pytest.fixture(scope="module")
def tiny():
    config = configs.get("lm_tiny:runlocal")
    setup = state_lib.make_setup(config)
    state = state_lib.per_device_bytes(setup.abstract_state, setup.state_shardings)
    state += state_lib.per_device_bytes(setup.abstract_state["params"], setup.state_shardings["params"])
    return config, setup, state, dryrun.activation_bytes(config, setup)


def _budget(monkeypatch, nbytes):
    monkeypatch.setattr(trainer, "_device_memory_budget", lambda: (int(nbytes), "test budget"))


def test_roomy_device_counts_the_state_only(tiny, monkeypatch):
    config, setup, state, act = tiny
    assert act > 0
    _budget(monkeypatch, 100 * (state + act))
    assert trainer.check_memory(setup, config) == state


def test_state_over_the_device_fails_naming_it(tiny, monkeypatch):
    config, setup, state, _ = tiny
    _budget(monkeypatch, state - 1)
    with pytest.raises(trainer.MemoryBudgetError, match="gradients alone"):
        trainer.check_memory(setup, config)


def test_activations_decide_when_the_state_is_large(tiny, monkeypatch):
    config, setup, state, act = tiny
    _budget(monkeypatch, state + act // 2)               # the state fits (and is over a quarter); the step not
    with pytest.raises(trainer.MemoryBudgetError, match="activations of one step") as e:
        trainer.check_memory(setup, config)
    assert "lm_tiny" in str(e.value)
    _budget(monkeypatch, state + act)                    # exactly fits
    assert trainer.check_memory(setup, config) == state + act


@pytest.mark.parametrize("name", ["lm_tiny:runlocal", "sse_h_tiny", "mamba_tiny"])
def test_the_skip_bound_bounds_the_traced_activations(name):
    config = configs.get(name)
    setup = state_lib.make_setup(config)
    act, bound = dryrun.activation_bytes(config, setup), trainer._activation_bound(config, setup)
    assert 0 < act <= bound / 2, (act, bound)          # at least 2x headroom over the worst measured ratio
