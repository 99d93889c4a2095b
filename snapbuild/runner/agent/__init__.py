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
    gpus = 1                # the agent gives it 1 of the node's GPUs (default 0: none, it sees what it sees)
    share_gpus = false      # true: it may be placed on GPUs others hold that share too
    replicas = 8            # optional: 8 servers embedder-0 .. embedder-7, on ports publish + i

Restarts back off (``backoff_s`` doubling up to ``backoff_max_s``); after
``cold_after`` restores in a row that fell back or failed, the server is booted cold
directly; after ``max_restarts`` deaths within ``restart_window_s`` it is marked
``failed`` and left alone (never a tight loop) until the agent restarts or its tag
moves. A snapshot refused as corrupt, hostile or untrusted (exit 5 or 10) is not
retried in that loop: the slot is ``refused`` (``/servers`` shows the digest, the
reason and when it is tried again) for a minute, doubling up to an hour while the same
digest is refused, or until its tag names another digest; a roll to a refused digest
waits the same way while the old version serves on. A roll starts the new version,
probes it ready, then stops the old one: for a container the agent itself listens on
``publish`` and forwards each connection to the current version, so the switch loses
no connection; a host process listens on the port it was built with, so the old one
must stop first (a short gap).

GPUs: the node's (``nvidia-smi``, read once at start) are given out by the agent, so
that a node of 8 GPUs serves 8 replicas, one on each. A server with ``gpus = N`` starts
on N GPUs nobody holds, lowest index first (a restart takes the ones it had while they
are still free), passed to the restore as ``gpus`` (its device map, or
``CUDA_VISIBLE_DEVICES`` for a cold boot); a held GPU goes to another server only when
both have ``share_gpus``. With too few free, the server is ``waiting`` ("waiting for N
free GPU(s): held by A, B") and starts once some are freed: when a server stops, dies
(before its restart) or fails to start. A roll beside the old version takes a second
set of GPUs when there are enough free; otherwise the old version stops first and the
new one starts on its GPUs (a short gap, logged as ``roll_stop_first``). More GPUs than
the node has is not refused at load: the server waits, and says so.

The agent writes what it started to ``state_dir/agent.json`` after every change, each
server as (pid, start time, boot id, its GPUs); when it starts again (after a crash or SIGKILL)
it adopts the servers recorded there that are still that very process and still
wanted, and stops the others: no orphans, no doubles, and never a process that merely
got a recorded PID (after a reboot nothing is adopted or killed). SIGTERM stops every
server and exits.

Each server is started, polled and rolled by a worker of its own, so one slow or hung
restore holds up nobody else; every tool it runs has a time limit (snapbuild.tools).

The parts: :mod:`.config` (the TOML), :mod:`.supervisor` (slots, their states, the
loop and the workers), :mod:`.gpus` (who holds which GPU), :mod:`.proxy` (a
container's node port), :mod:`.api` (``GET /servers``, ``/servers/NAME/log?lines=N``,
``/metrics``, ``/healthz``; it has no authentication: the agent warns at start when
``api`` is not on loopback), :mod:`.metrics`, and :mod:`.serve`, which runs the
supervisor with its API (``snapbuild-runner serve``).
"""

from .config import AgentConfig, ServerConfig, config_from_flags, load_config
from .gpus import GpuPool
from .metrics import Metrics, reason_kind
from .proxy import Proxy, parse_address
from .supervisor import Agent, Slot, State

__all__ = ["Agent", "AgentConfig", "GpuPool", "Metrics", "Proxy", "ServerConfig", "Slot", "State", "config_from_flags",
           "load_config", "parse_address", "reason_kind"]


