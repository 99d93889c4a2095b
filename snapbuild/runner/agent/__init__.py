"""``snapbuild-runner serve``: a node agent that keeps a declared set of snapshots running.

The configuration (TOML) names the servers; for each, the agent restores the
snapshot (or boots it cold, with the reason), watches it, restarts it when it dies,
and rolls to a new digest when its tag moves::

    registry = "oci://registry.internal:5000/team"   # the default for every server
    trust_policy = "/etc/snapbuild/policy.json"       # optional
    cache_max = "200G"                               # optional: bound the node's store
    poll_s = 30                                      # how often tags are looked up again
    api = "127.0.0.1:9411"                           # or "unix:/run/snapbuild/agent.sock"
    state_dir = "/var/lib/snapbuild/agent"
    stale_after_s = 60                               # /healthz fails past this

    [[server]]
    name = "embedder"
    ref = "minilm-embedder:prod"
    publish = 8713          # containers only: the node port the agent serves it on
    lazy_pages = true       # host processes: CRIU lazy pages (default $SNAPBUILD_LAZY_PAGES, else on)

Restarts back off (``backoff_s`` doubling up to ``backoff_max_s``); after
``cold_after`` restores in a row that fell back or failed, the server is booted cold
directly; after ``max_restarts`` deaths within ``restart_window_s`` it is marked
``failed`` and left alone (never a tight loop) until the agent restarts or its tag
moves. A roll starts the new version, probes it ready, then stops the old one: for a
container the agent itself listens on ``publish`` and forwards each connection to the
current version, so the switch loses no connection; a host process listens on the
port it was built with, so the old one must stop first (a short gap).

The agent writes what it started to ``state_dir/agent.json`` after every change, each
server as (pid, start time, boot id); when it starts again (after a crash or SIGKILL)
it adopts the servers recorded there that are still that very process and still
wanted, and stops the others: no orphans, no doubles, and never a process that merely
got a recorded PID (after a reboot nothing is adopted or killed). SIGTERM stops every
server and exits.

Each server is started, polled and rolled by a worker of its own, so one slow or hung
restore holds up nobody else; every tool it runs has a time limit (snapbuild.tools).

The parts: :mod:`.config` (the TOML), :mod:`.supervisor` (slots, their states, the
loop and the workers), :mod:`.proxy` (a container's node port), :mod:`.api` (``GET
/servers``, ``/servers/NAME/log?lines=N``, ``/metrics``, ``/healthz``), :mod:`.metrics`.
"""

from .config import AgentConfig, ServerConfig, config_from_flags, load_config
from .metrics import Metrics, reason_kind
from .proxy import Proxy, parse_address
from .supervisor import Agent, Slot, State

__all__ = ["Agent", "AgentConfig", "Metrics", "Proxy", "ServerConfig", "Slot", "State", "config_from_flags",
           "load_config", "parse_address", "reason_kind"]


