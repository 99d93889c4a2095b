"""A Hub that gets no answer is a step error with the address and a tip, never a
traceback: huggingface_hub's httpx backend raises transport errors that are not
OSErrors (a refused connection here, a name that does not resolve)."""

from __future__ import annotations

import pytest

from snapbuild.errors import StepError
from snapbuild.steps.weight_sources import HubSource
from snapbuild.steps.weights import WeightsSpec


@pytest.mark.parametrize("endpoint,why", [("http://127.0.0.1:1", "Connection refused"),
                                          ("http://no-such-host.invalid", "ConnectError")])
def test_an_unreachable_hub_is_a_step_error_that_names_it(endpoint, why, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    spec = WeightsSpec(kind="weights", source="hf://org/model")
    with pytest.raises(StepError, match=f"hf://org/model: the Hub at {endpoint} cannot be reached .*{why}") as e:
        HubSource().resolve(spec, None)
    assert "HF_ENDPOINT" in (e.value.hint or "")


def test_the_cli_says_so_without_a_traceback(run_cli, recipe):
    path = recipe('name: w\nsteps:\n  w: {kind: weights, source: "hf://org/model"}\n')
    r = run_cli("plan", path, env={"HF_ENDPOINT": "http://127.0.0.1:1"})
    assert r.code != 0 and "Traceback" not in r.err + r.out, r.err
    assert "the Hub at http://127.0.0.1:1 cannot be reached" in r.err, r.err
