"""The agent gives GPUs to its servers: the pool's rules on their own, then an agent on
an injected node driving fake servers (``sleep`` processes a fake ``restore.run``
starts, with the ``gpus`` it was given) through starts, deaths, waits, rolls, adoption
and its configuration."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from snapbuild.errors import UsageError
from snapbuild.runner.agent import Agent, AgentConfig, GpuPool, ServerConfig, State, load_config
from snapbuild.store import Store

UUIDS = [f"GPU-0000000{i}-aaaa-bbbb-cccc-00000000000{i}" for i in range(8)]
DIGEST = "sha256:" + "a" * 64


# --- the pool ---------------------------------------------------------------------------
def test_gpus_go_out_lowest_index_first_and_never_twice():
    pool = GpuPool(UUIDS[:4])
    assert pool.assign("a", 1) == [0]
    assert pool.assign("b", 2) == [1, 2]
    assert pool.assign("c", 2) == "waiting for 2 free GPU(s): held by a, b", "all or nothing"
    assert pool.held("c") == [] and pool.free_count() == 1
    assert pool.assign("c", 1) == [3]
    assert pool.free("b") == [1, 2] and pool.free_count() == 2
    assert pool.assign("d", 2) == [1, 2], "freed GPUs are given again"
    assert pool.assignments() == [(0, UUIDS[0], "a"), (1, UUIDS[1], "d"), (2, UUIDS[2], "d"), (3, UUIDS[3], "c")]


def test_more_gpus_than_the_node_has_is_a_reason_to_wait():
    assert GpuPool(UUIDS[:2]).assign("a", 3) == "waiting for 3 free GPU(s): this node has only 2"
    assert GpuPool([]).assign("a", 1) == "waiting for 1 free GPU(s): this node has no GPU (nvidia-smi sees none)"
    assert GpuPool([]).assign("a", 0) == [], "none wanted, none needed"


def test_a_held_gpu_is_shared_only_when_both_share():
    pool = GpuPool(UUIDS[:2])
    assert pool.assign("solo", 1) == [0]
    assert pool.assign("s1", 1, share=True) == [1]
    assert pool.assign("s2", 1, share=True) == [1], "sharers share, and never take a non-sharer's GPU"
    assert pool.assign("other", 1) == "waiting for 1 free GPU(s): held by solo, s1, s2", "a non-sharer takes none"
    assert pool.holders(1) == ["s1", "s2"]
    pool.free("solo")
    assert pool.assign("s3", 1, share=True) == [0], "a sharer takes a free GPU before a shared one"
    assert pool.assign("s4", 2, share=True) == [0, 1]


def test_a_restart_takes_the_gpus_it_had_while_they_are_free():
    pool = GpuPool(UUIDS[:4])
    pool.assign("a", 1)
    assert pool.assign("b", 1) == [1]
    pool.free("a")
    had = pool.free("b")
    assert pool.assign("b", 1, prefer=had) == [1], "its own again, not the lowest free one"
    pool.assign("c", 1)  # takes 0
    pool.free("b")
    pool.assign("d", 1, prefer=[0])  # its preferred one is taken: the lowest free instead
    assert pool.held("d") == [1]
    assert pool.assign("b", 1, prefer=had) == [2], "taken meanwhile: the lowest free one"


def test_a_successor_gets_other_gpus_and_takes_over_the_name():
    pool = GpuPool(UUIDS[:2])
    pool.assign("web", 1, share=True)
    assert pool.assign("web (next)", 1, share=True, exclude=[0]) == [1], "never its predecessor's, shared or not"
    pool.free("web")
    pool.rename("web (next)", "web")
    assert pool.assignments() == [(1, UUIDS[1], "web")]
    assert pool.assign("x", 2, exclude=[1]) == "waiting for 2 free GPU(s): held by web"


def test_adopted_gpus_are_recorded_as_they_were():
    pool = GpuPool(UUIDS[:2])
    pool.take("a", pool.indexes([UUIDS[1], "GPU-not-here"]))
    assert pool.held("a") == [1]
    assert pool.assign("b", 2) == "waiting for 2 free GPU(s): held by a"


# --- an agent on an injected node -------------------------------------------------------
class FakeNode:
    """``restore.run`` and ``restore.stop`` for the agent: each start is a ``sleep``
    process, recorded with the keywords it got."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.procs: dict[int, subprocess.Popen] = {}

    def run(self, ref: str, *, gpus: list[str] | None = None, **kw) -> dict:
        p = subprocess.Popen(["sleep", "600"])
        self.procs[p.pid] = p
        self.calls.append({"ref": ref, "gpus": gpus, "passed": gpus is not None, "pid": p.pid,
                           "running": [q for q, proc in self.procs.items() if proc.poll() is None and q != p.pid]})
        out = {"pid": p.pid, "digest": ref.partition("@")[2] or DIGEST, "mode": "restore", "reason": None,
               "timings": {"total_s": 0.01}}
        if kw.get("publish"):
            out |= {"container": f"sb-fake-{p.pid}", "address": "127.0.0.1:9"}
        if gpus is not None:
            out["gpus"] = gpus
        return out

    def stop(self, target: int | str) -> bool:
        pid = int(str(target).rpartition("-")[2])
        self.kill(pid)
        return True

    def kill(self, pid: int) -> None:
        self.procs[pid].kill()
        self.procs[pid].wait()

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def node(monkeypatch):
    from snapbuild.runner import restore

    fake = FakeNode()
    monkeypatch.setattr(restore, "run", fake.run)
    monkeypatch.setattr(restore, "stop", fake.stop)
    yield fake
    fake.close()


def make_agent(tmp_path, *servers: ServerConfig, gpus: int = 2, records: list | None = None) -> Agent:
    config = AgentConfig(servers=list(servers), state_dir=tmp_path / "state", poll_s=3600)
    return Agent(config, store=Store(tmp_path / "home"), gpus=UUIDS[:gpus],
                 log=(records.append if records is not None else lambda record: None))


def server(name: str, gpus: int = 1, **kw) -> ServerConfig:
    return ServerConfig(name=name, ref=f"{name}:prod", gpus=gpus, **{"backoff_s": 0.05, "backoff_max_s": 0.1, **kw})


def drive(agent: Agent, pred, what: str, timeout: float = 10) -> None:
    """Run the agent's loop until ``pred()`` holds (and its workers are idle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agent.tick()
        if pred() and not any(s.job for s in agent.slots.values()):
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}: " +
                         json.dumps({n: [s.state, s.gpus, s.last_error] for n, s in agent.slots.items()}))


def held(agent: Agent, name: str) -> list[int]:
    return [g["index"] for g in agent.slots[name].gpus]


def metric(agent: Agent, name: str, **labels) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(agent.metrics.text().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def test_each_server_starts_on_gpus_of_its_own_and_a_third_waits_for_one(node, tmp_path):
    records: list[dict] = []
    agent = make_agent(tmp_path, server("a", backoff_s=60, backoff_max_s=60), server("b"), server("c"),
                       records=records)
    ready = lambda *names: lambda: all(agent.slots[n].state == State.READY for n in names)  # noqa: E731
    drive(agent, ready("a", "b"), "a and b ready")
    assert held(agent, "a") == [0] and held(agent, "b") == [1]
    assert sorted(c["gpus"][0] for c in node.calls) == UUIDS[:2], "each start was told its GPU's UUID"
    c = agent.slots["c"]
    assert c.state == State.WAITING and c.last_error == "waiting for 1 free GPU(s): held by a, b"
    assert [r["reason"] for r in records if r["event"] == "waiting_for_gpus"] == [c.last_error], "said once"
    view = c.view()
    assert view["state"] == "waiting" and view["gpus"] == []
    assert agent.slots["a"].view()["gpus"] == [{"index": 0, "uuid": UUIDS[0]}]
    assert metric(agent, "snapbuild_gpu_assigned", gpu="0", uuid=UUIDS[0], server="a") == 1
    assert metric(agent, "snapbuild_gpus_free") == 0
    node.kill(agent.slots["a"].pid)  # a dies, and backs off for a minute: its GPU is free meanwhile
    drive(agent, ready("c"), "c on a's GPU")
    assert held(agent, "c") == [0] and node.calls[-1]["gpus"] == [UUIDS[0]]
    assert agent.slots["a"].state == State.RESTARTING and agent.slots["a"].gpus == []
    assert metric(agent, "snapbuild_gpu_assigned", gpu="0", uuid=UUIDS[0], server="a") is None, "freed: gone"
    assert metric(agent, "snapbuild_gpu_assigned", gpu="0", uuid=UUIDS[0], server="c") == 1
    agent.slots["a"].next_try = 0  # its backoff is over
    drive(agent, lambda: agent.slots["a"].state == State.WAITING, "a waiting")
    assert agent.slots["a"].last_error == "waiting for 1 free GPU(s): held by c, b"
    agent.shutdown()
    assert agent.gpus.assignments() == [] and metric(agent, "snapbuild_gpus_free") == 2


def test_a_restarted_server_gets_the_gpu_it_had_while_it_is_free(node, tmp_path):
    agent = make_agent(tmp_path, server("a", backoff_s=60, backoff_max_s=60), server("b"), gpus=3)
    drive(agent, lambda: all(s.state == State.READY for s in agent.slots.values()), "ready")
    assert (held(agent, "a"), held(agent, "b")) == ([0], [1])
    node.kill(agent.slots["a"].pid)
    drive(agent, lambda: agent.slots["a"].state == State.RESTARTING, "a backing off")
    node.kill(agent.slots["b"].pid)
    drive(agent, lambda: agent.slots["b"].state == State.READY and agent.slots["b"].restarts == 1, "b restarted")
    assert held(agent, "b") == [1], "its own GPU again, though 0 is free and lower"
    assert node.calls[-1]["gpus"] == [UUIDS[1]]
    agent.shutdown()


def test_servers_that_take_no_gpus_are_started_as_before(node, tmp_path):
    agent = make_agent(tmp_path, server("plain", gpus=0), server("one"))
    drive(agent, lambda: all(s.state == State.READY for s in agent.slots.values()), "ready")
    calls = {c["ref"]: c for c in node.calls}
    assert calls["plain:prod"]["passed"] is False, "no gpus keyword: it sees the GPUs it would see anyway"
    assert calls["one:prod"]["gpus"] == [UUIDS[0]] and agent.slots["plain"].gpus == []
    agent.shutdown()


def test_sharing_servers_share_a_gpu_others_do_not(node, tmp_path):
    agent = make_agent(tmp_path, server("s1", share_gpus=True), server("s2", share_gpus=True), server("solo"),
                       gpus=1)
    drive(agent, lambda: agent.slots["s1"].state == agent.slots["s2"].state == State.READY, "sharers ready")
    assert held(agent, "s1") == held(agent, "s2") == [0]
    assert agent.slots["solo"].last_error == "waiting for 1 free GPU(s): held by s1, s2"
    agent.shutdown()


def test_more_gpus_than_the_node_has_waits_with_the_reason(node, tmp_path):
    agent = make_agent(tmp_path, server("big", gpus=3))
    drive(agent, lambda: agent.slots["big"].state == State.WAITING, "waiting")
    assert agent.slots["big"].last_error == "waiting for 3 free GPU(s): this node has only 2" and node.calls == []
    agent.shutdown()


def test_a_failed_start_frees_its_gpus(node, tmp_path, monkeypatch):
    from snapbuild.errors import SnapbuildError
    from snapbuild.runner import restore

    def broken(ref, **kw):
        raise SnapbuildError("the registry is down")

    monkeypatch.setattr(restore, "run", broken)
    agent = make_agent(tmp_path, server("a", backoff_s=60, backoff_max_s=60), gpus=1)
    drive(agent, lambda: agent.slots["a"].last_error == "the registry is down", "a failed start")
    assert agent.slots["a"].gpus == [] and agent.gpus.free_count() == 1


def container(name: str, port: int, **kw) -> ServerConfig:
    return server(name, publish=port, **kw)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready_container(tmp_path, gpus: int, records: list[dict] | None = None):
    """An agent on a node of ``gpus`` GPUs whose container server "web" is ready: (agent, slot, its pid)."""
    agent = make_agent(tmp_path, container("web", free_port()), gpus=gpus, records=records)
    agent._prefetch = lambda cfg, digest: None  # type: ignore[method-assign]
    drive(agent, lambda: agent.slots["web"].state == State.READY, "ready")
    slot = agent.slots["web"]
    return agent, slot, slot.pid


def test_a_roll_beside_the_old_version_takes_a_second_set_of_gpus(node, tmp_path):
    agent, slot, old = ready_container(tmp_path, gpus=2)
    try:
        assert agent.roll(slot, "sha256:" + "b" * 64)
        new_start = node.calls[-1]
        assert new_start["gpus"] == [UUIDS[1]] and old in new_start["running"], "beside the old one, on GPU 1"
        assert held(agent, "web") == [1] and agent.gpus.assignments() == [(1, UUIDS[1], "web")], "GPU 0 freed"
        assert metric(agent, "snapbuild_gpu_assigned", gpu="1", uuid=UUIDS[1], server="web") == 1
        assert metric(agent, "snapbuild_gpu_assigned", gpu="0", uuid=UUIDS[0], server="web") is None
        assert json.loads(agent.state_path.read_text())["servers"]["web"]["gpus"] == [UUIDS[1]]
    finally:
        agent.shutdown()


def test_without_a_second_set_of_gpus_a_roll_stops_the_old_version_first(node, tmp_path):
    records: list[dict] = []
    agent, slot, old = ready_container(tmp_path, gpus=1, records=records)
    try:
        assert agent.roll(slot, "sha256:" + "b" * 64)
        new_start = node.calls[-1]
        assert new_start["gpus"] == [UUIDS[0]] and old not in new_start["running"], "the old one stopped first"
        assert held(agent, "web") == [0] and agent.gpus.assignments() == [(0, UUIDS[0], "web")]
        [choice] = [r for r in records if r["event"] == "roll_stop_first"]
        assert "no second set of 1 GPU(s)" in choice["reason"] and "held by web" in choice["reason"]
    finally:
        agent.shutdown()


def test_an_agent_restarted_adopts_its_servers_with_their_gpus(node, tmp_path):
    first = make_agent(tmp_path, server("a"), server("b"), gpus=3)
    drive(first, lambda: all(s.state == State.READY for s in first.slots.values()), "ready")
    pids = {n: s.pid for n, s in first.slots.items()}
    assert json.loads(first.state_path.read_text())["servers"]["b"]["gpus"] == [UUIDS[1]]
    # "SIGKILL": the first agent is simply dropped; its servers keep running
    second = make_agent(tmp_path, server("b"), server("c", gpus=2), gpus=3)
    second.adopt()
    assert second.slots["b"].pid == pids["b"] and held(second, "b") == [1], "b keeps its GPU"
    assert node.procs[pids["a"]].poll() is not None, "a is not wanted any more: stopped"
    drive(second, lambda: second.slots["c"].state == State.READY, "c ready")
    assert held(second, "c") == [0, 2], "a's GPU was freed with it; b's is b's"
    assert len(node.calls) == 3, "b was adopted, not started again"
    second.shutdown()


# --- the configuration ------------------------------------------------------------------
def test_gpu_keys_and_replicas_in_the_configuration(tmp_path):
    path = tmp_path / "agent.toml"

    def load(text: str):
        path.write_text(text)
        return load_config(path)

    s = load('[[server]]\nname = "a"\nref = "a:b"\ngpus = 2\nshare_gpus = true\n').servers[0]
    assert (s.gpus, s.share_gpus) == (2, True)
    s = load('[[server]]\nname = "a"\nref = "a:b"\n').servers[0]
    assert (s.gpus, s.share_gpus) == (0, False), "by default the agent gives no GPU"
    assert load('[[server]]\nname = "a"\nref = "a:b"\ngpus = 64\n').servers[0].gpus == 64, "checked when started"
    servers = load('[[server]]\nname = "emb"\nref = "e:p"\nreplicas = 3\npublish = 9000\ngpus = 1\n').servers
    assert [(s.name, s.publish, s.gpus) for s in servers] == [("emb-0", 9000, 1), ("emb-1", 9001, 1),
                                                              ("emb-2", 9002, 1)]
    for text, message in [
            ('[[server]]\nname = "a"\nref = "a:b"\ngpus = "1"\n', "`gpus` must be an integer"),
            ('[[server]]\nname = "a"\nref = "a:b"\ngpus = true\n', "`gpus` must be an integer"),
            ('[[server]]\nname = "a"\nref = "a:b"\ngpus = -1\n', "`gpus` must be 0 or more"),
            ('[[server]]\nname = "a"\nref = "a:b"\nshare_gpus = 1\n', "`share_gpus` must be true or false"),
            ('[[server]]\nname = "a"\nref = "a:b"\nreplicas = 2\n', "`replicas = 2` needs `publish`"),
            ('[[server]]\nname = "a"\nref = "a:b"\nreplicas = 0\npublish = 1\n', "`replicas` must be 1 or more"),
            ('[[server]]\nname = "a"\nref = "a:b"\nreplicas = 2\npublish = 1\n'
             '[[server]]\nname = "a-1"\nref = "a:b"\n', "number 2: a second server named 'a-1'")]:
        with pytest.raises(UsageError, match=message.replace("[", r"\[")):
            load(text)
