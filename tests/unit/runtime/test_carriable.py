"""runtime.carriable: what CRIU cannot dump, found in a (fake) /proc by fd link, and
unix sockets whose peer is outside the tree."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from snapbuild.runtime import carriable


def fake_proc(root: Path, procs: dict[int, tuple[str, dict[int, str]]]) -> Path:
    """/proc with, for each pid, its cmdline and its fd links ({fd: target})."""
    for pid, (cmd, fds) in procs.items():
        (root / str(pid) / "fd").mkdir(parents=True)
        (root / str(pid) / "cmdline").write_bytes(cmd.replace(" ", "\0").encode() + b"\0")
        for fd, target in fds.items():
            os.symlink(target, root / str(pid) / "fd" / str(fd))
    return root


def test_each_kind_is_named_with_process_command_line_and_fd(tmp_path):
    proc = fake_proc(tmp_path, {
        100: ("python -m vllm.entrypoints.openai.api_server", {0: "/dev/null", 7: "anon_inode:[io_uring]",
                                                               8: "anon_inode:[eventpoll]"}),
        101: ("python worker.py", {3: "anon_inode:[perf_event]", 4: "anon_inode:bpf-prog",
                                  5: "anon_inode:[userfaultfd]", 6: "anon_inode:inotify",
                                  9: "anon_inode:[pidfd]", 10: "anon_inode:bpf-map", 11: "/dev/shm/x"}),
    })
    found = carriable.scan([101, 100], proc=proc, peers={})
    assert [(f.pid, f.fd, f.kind) for f in found] == [(100, 7, "io_uring"), (101, 3, "perf"), (101, 4, "bpf"),
                                                      (101, 5, "userfaultfd")]
    assert found[0].describe() == ("process 100 (python -m vllm.entrypoints.openai.api_server) holds an io_uring "
                                   "instance on fd 7 (anon_inode:[io_uring])")


def test_a_clean_tree_has_nothing(tmp_path):
    proc = fake_proc(tmp_path, {5: ("server", {1: "/var/log/x", 3: "socket:[77]", 4: "anon_inode:[eventfd]"})})
    assert carriable.scan([5], proc=proc, peers={77: 0}) == []


def test_a_unix_socket_whose_peer_an_outside_process_holds_is_named(tmp_path):
    proc = fake_proc(tmp_path, {
        10: ("server", {3: "socket:[500]", 4: "socket:[502]"}),
        11: ("server worker", {3: "socket:[501]"}),
        99: ("rsyslogd", {5: "socket:[503]"}),
    })
    # 500 <-> 501: both ends in the tree (fine); 502 <-> 503: the other end is outside
    found = carriable.scan([10, 11], proc=proc, peers={500: 501, 501: 500, 502: 503, 503: 502})
    assert [(f.pid, f.fd, f.kind) for f in found] == [(10, 4, carriable.PEER)]
    assert found[0].describe() == ("process 10 (server) holds a unix socket connected to a process outside its tree "
                                   "(pid 99: rsyslogd) on fd 4 (socket:[502])")
    # a peer nobody holds any more is CRIU's to handle, not an outside process
    assert carriable.scan([10, 11], proc=proc, peers={502: 999}) == []


def test_parse_ss_reads_inode_and_peer_and_skips_unconnected():
    text = ("u_str ESTAB  0 0        * 313509 * 313510\n"
            "u_str LISTEN 0 100 /tmp/sock 313512 * 0\n"
            "u_dgr ESTAB  0 0 * 4242 /run/systemd/journal/dev-log 1700\n"
            "garbage\n")
    assert carriable.parse_ss(text) == {313509: 313510, 4242: 1700}


def test_unix_peers_sees_a_real_socket_pair():
    a, b = socket.socketpair()
    try:
        ia, ib = os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino
        peers = carriable.unix_peers([os.getpid()])
        assert peers.get(ia) == ib and peers.get(ib) == ia
    finally:
        a.close()
        b.close()
