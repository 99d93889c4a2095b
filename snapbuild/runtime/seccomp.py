"""io_uring denied, as Docker and containerd deny it: servers start checkpointable.

CRIU cannot checkpoint an io_uring instance, and libuv >= 1.45 (uvloop, so vLLM's API
server) opens one per event loop whatever ``UV_USE_IO_URING`` says. Docker's and
containerd's default seccomp profiles answer ``io_uring_setup``, ``io_uring_enter`` and
``io_uring_register`` with EPERM; libuv, liburing users and Python then fall back to
epoll. Warm-ups and cold boots get the same filter: default allow, those three EPERM,
on the machine's own architecture and its 32-bit ones (an i386 binary's
``io_uring_setup`` is another syscall number). CRIU dumps and restores seccomp
filters, so a restored server keeps it. A recipe opts out with ``io_uring: allow`` on
its warm-up (:data:`ALLOW`, recorded in the runtime section's server spec).

Host processes (plain and in namespaces of their own): the filter is compiled here,
in the parent, by libseccomp (PyPI ``pyseccomp``, ctypes bindings to the system's
``libseccomp.so.2``), exported as a classic BPF program, and installed by a tiny exec
wrapper, ``python -I -S -c LOADER HEX ARGV...``, that calls ``prctl(PR_SET_SECCOMP)``
and then ``execvp``\\s the server. Why a wrapper: loading in the child between fork and
exec (``preexec_fn``) runs Python in the child of a possibly multi-threaded parent,
which is not async-signal-safe; and why not the whole of libseccomp in the wrapper:
``import pyseccomp`` costs 100 ms or more at start-up (``ctypes.util.find_library``
runs ``ldconfig``), a bare ``-I -S`` interpreter with ctypes about 30 ms. The wrapper
imports nothing outside the standard library, reads no ``PYTHON*`` variable and no
site-packages (``-I -S``), so a server's ``PYTHONPATH`` cannot change it.

Containers (runc): the OCI runtime's own seccomp support (:func:`oci_profile`).
"""

from __future__ import annotations

import errno
import functools
import platform
import sys
import tempfile

from ..errors import NodeError

SYSCALLS = ("io_uring_setup", "io_uring_enter", "io_uring_register")
DENY, ALLOW = "deny", "allow"
CHOICES = (DENY, ALLOW)
#: The architectures a filter covers, by the machine's: its own and the 32-bit ABIs its
#: kernel also runs (as Docker's default profile lists them).
_ARCHES = {"x86_64": ("X86_64", "X86", "X32"), "aarch64": ("AARCH64", "ARM")}
_OCI_ARCHES = {"x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
               "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]}

# Runs in the wrapper, then execs the server. PR_SET_SECCOMP (22) with
# SECCOMP_MODE_FILTER (2) needs CAP_SYS_ADMIN or no_new_privs: root has the first, so
# setuid programs in the server keep working; others get PR_SET_NO_NEW_PRIVS (38).
# A filter that cannot be installed stops the start (exit 126): never a silent
# server that would fail at its checkpoint.
LOADER = """\
import ctypes, os, sys
prog = bytes.fromhex(sys.argv[1])
class F(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
libc = ctypes.CDLL(None, use_errno=True)
f = F(len(prog) // 8, prog)
if libc.prctl(22, 2, ctypes.byref(f), 0, 0) != 0:
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(f), 0, 0) != 0:
        sys.stderr.write("snapbuild: cannot deny io_uring (seccomp): %s\\n" % os.strerror(ctypes.get_errno()))
        os._exit(126)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write("snapbuild: cannot start %r: %s\\n" % (sys.argv[2], e.strerror))
    os._exit(127)
"""


def wrap(argv: list[str], io_uring: str = DENY) -> list[str]:
    """``argv`` as a host process starts it: through the loader that denies io_uring,
    unless ``io_uring`` is :data:`ALLOW`."""
    if io_uring == ALLOW:
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", LOADER, program().hex(), *argv]


@functools.lru_cache(maxsize=1)
def program() -> bytes:
    """The filter as a classic BPF program (``struct sock_filter[]``), compiled by
    libseccomp for this machine's architectures."""
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as e:  # RuntimeError: pyseccomp found no libseccomp.so.2
        raise NodeError(f"cannot deny io_uring to the server: libseccomp is missing ({e})",
                        hint="install libseccomp2 (apt-get install libseccomp2) and the pyseccomp package "
                             "(part of snapbuild's dependencies)") from None
    flt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    for arch in _ARCHES.get(platform.machine(), ()):
        try:
            flt.add_arch(getattr(pyseccomp.Arch, arch))
        except OSError as e:
            if e.errno != errno.EEXIST:  # the native one is there already
                raise
    for name in SYSCALLS:
        flt.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
    with tempfile.TemporaryFile() as f:
        flt.export_bpf(f)
        f.seek(0)
        return f.read()


def oci_profile() -> dict:
    """``linux.seccomp`` of an OCI runtime spec: the same rule, for runc to install."""
    return {"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": _OCI_ARCHES.get(platform.machine(), []),
            "syscalls": [{"names": list(SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}]}


def mode(pid: int) -> int | None:
    """``Seccomp:`` of ``/proc/PID/status``: 0 none, 1 strict, 2 filter; None if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None

