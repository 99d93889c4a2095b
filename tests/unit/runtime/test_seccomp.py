"""runtime.seccomp: the io_uring deny, installed by the real exec wrapper into a real
child, with libseccomp compiling the filter."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from snapbuild.runtime import seccomp

# io_uring_setup(1, params) in the child: prints the fd (>= 0) or the errno's name.
PROBE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 1, params)
print(fd if fd >= 0 else errno.errorcode[ctypes.get_errno()])
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0])
"""


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_wrapper_denies_io_uring_with_eperm_and_nothing_else():
    plain = run([sys.executable, "-c", PROBE]).stdout.split()
    if not plain or not plain[0].isdigit():
        pytest.skip(f"this kernel gives no io_uring to anyone ({plain})")
    assert plain[1] == "0", "no filter without the wrapper"
    denied = run(seccomp.wrap([sys.executable, "-c", PROBE]))
    assert denied.returncode == 0, denied.stderr
    assert denied.stdout.split() == ["EPERM", "2"], "io_uring_setup answered EPERM, under a seccomp filter"
    assert run(seccomp.wrap(["sh", "-c", "echo ok; exec cat /proc/self/status"])).stdout.startswith("ok\n"), \
        "everything else is allowed, and the filter passes on through exec"


def test_allow_starts_the_command_as_it_is():
    argv = [sys.executable, "-c", PROBE]
    assert seccomp.wrap(argv, seccomp.ALLOW) == argv


def test_a_missing_command_is_said_in_the_log_with_exit_127():
    r = run(seccomp.wrap(["/nonexistent/server", "--port", "1"]))
    assert r.returncode == 127 and "cannot start '/nonexistent/server'" in r.stderr


def test_the_filter_is_libseccomps_for_this_machine():
    prog = seccomp.program()
    assert len(prog) % 8 == 0 and len(prog) >= 8 * 8, "a struct sock_filter array"
    profile = seccomp.oci_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert profile["syscalls"] == [{"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
                                    "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}]


def test_mode_reads_the_seccomp_line():
    assert seccomp.mode(1 << 30) is None
    assert seccomp.mode(os.getpid()) in (0, 2)
