"""``snapbuild-runner serve`` put together: the supervisor (:mod:`.supervisor`) and its HTTP
API (:mod:`.api`), which reads the supervisor's slots. Here, and not in the supervisor,
so that the API depends on the supervisor and not the other way round.
"""

from __future__ import annotations

from .api import exposure_warning, start_api
from .supervisor import Agent


def serve_forever(agent: Agent, interval: float = 0.25) -> None:
    """Run ``agent`` and serve its API until SIGTERM or SIGINT; then stop every server, and
    the API last."""
    agent.prepare()
    api = start_api(agent)
    exposed = exposure_warning(agent.config.api)
    if exposed:
        agent.log("warning", message=exposed, api=agent.config.api)
    agent.log("serving", servers=list(agent.slots), api=agent.config.api, gpus=agent.gpus.count)
    try:
        agent.loop(interval)
    finally:
        agent.shutdown()
        api.shutdown()
