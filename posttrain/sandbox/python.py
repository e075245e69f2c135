"""Run untrusted Python (model-written code) in a throwaway Linux sandbox.

    result = run_python("print(input()[::-1])", stdin="abc\\n", limits=SandboxLimits(wall_s=5))
    result.stdout == "cba\\n"

Three processes, each doing one job (threat model and limits: docs/sandbox.md):

    parent (run_python)  spawns `python -I -S python.py --sandbox-init` with a clean environment,
      |                  streams stdin, reads stdout/stderr up to a cap, enforces the wall clock
      A (setup)          unshares user, mount, pid, net, ipc, uts and cgroup namespaces; a forked
      |                  helper that stays outside writes the uid/gid maps
      C (pid 1)          builds a new root on a tmpfs mounted over /tmp in its own mount namespace
      |                  (read-only binds of the system libraries, the Python install at /python,
      |                  a size-capped tmpfs /tmp, minimal /dev and /etc, its own /proc),
      |                  pivot_roots into it and re-executes itself as
      |                  `/python/bin/python -I -S /sandbox.py`, so its command line names no host
      |                  path; then waits for D and reports D's status on a private pipe
      D (user code)      drops to uid 1000 inside (an unprivileged uid outside), no capabilities,
                         no_new_privs, rlimits, all other fds closed; execs `python -I main.py`

Nothing is created on the host: the root's tmpfs covers /tmp only inside the namespace, so a
killed trainer leaves no directory behind. When C exits the kernel kills every process left in
its pid namespace, and the namespace's mounts (everything the code wrote) vanish with it. The
parent stops a run by asking A to kill C, so `run_python` returns only after the namespace is
empty.

This module runs as A, C and D too (`python -I -S python.py --sandbox-init`, then
`--sandbox-pid1` from inside the root), so it imports only the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import platform
import resource
import selectors
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

SANDBOX_UID = 1000
"""The uid (and gid) the code runs as inside the sandbox."""
NOBODY = 65534
"""The uid (and gid) it maps to outside when the parent is root, so it owns no host file."""

# Linux constants (include/uapi/linux/sched.h, mount.h, prctl.h).
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

EXIT_SETUP_FAILED = 125
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
PYTHON_INSIDE = "/python"
"""Where a Python install outside SYSTEM_DIRS (pyenv, uv, conda...) appears in the sandbox."""
INIT_INSIDE = "/sandbox.py"
"""This module's source, copied into the root so that C re-executes from a path inside."""
ROOT_MOUNT_POINTS = ("/tmp", "/mnt", "/var/tmp", "/media", "/srv")
"""Host directories the root's tmpfs may cover (inside the mount namespace only): the first
that exists and holds no directory the sandbox binds from is used."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    """Wall-clock seconds for the whole run, sandbox start-up (about 0.1 s) included."""
    cpu_s: float = 5.0
    """CPU seconds per process (RLIMIT_CPU, rounded up to whole seconds)."""
    memory_mb: int = 512
    """Address space per process (RLIMIT_AS). Per process, not in total: see max_processes."""
    max_output_bytes: int = 1 << 20
    """Cap on stdout and on stderr each; the run is killed and `truncated` set when passed."""
    max_processes: int = 8
    """Processes plus threads the code may have at once, its main thread included."""
    disk_mb: int = 64
    """Size of the writable tmpfs (/tmp, the working directory; /dev/shm shares it)."""
    max_file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    """Exit code of the code's main process, -N when signal N killed it, None when the parent
    killed the sandbox first (wall clock or output cap)."""
    stdout: str
    stderr: str
    timed_out: bool
    """The wall clock or the CPU limit ran out."""
    truncated: bool
    """stdout or stderr passed `max_output_bytes`; the run was killed and the output cut there."""
    wall_s: float
    cpu_s: float
    """CPU time of the main process (user + system); 0.0 when it was killed from outside."""
    max_rss_mb: float
    """Peak resident memory of the main process; 0.0 when it was killed from outside."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.truncated


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (no user namespaces, seccomp or AppArmor blocks
    them...). The code was not run: posttrain never runs untrusted code unprotected."""


HOW_TO_ENABLE = (
    "the code sandbox needs unprivileged user namespaces (docs/sandbox.md): check "
    "`unshare --user --map-root-user --pid --fork --mount --net true`; on Ubuntu 23.10+ set "
    "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`, on older Debian "
    "`sysctl kernel.unprivileged_userns_clone=1`, in Docker run with "
    "`--security-opt seccomp=unconfined` (the default profile blocks unshare)"
)


# ----------------------------------------------------------------------------------------------
# Parent side


def run_python(
    code: str,
    *,
    stdin: str = "",
    args: Sequence[str] = (),
    limits: SandboxLimits | None = None,
) -> SandboxResult:
    """Run `code` as `python -I main.py *args` in a fresh sandbox and return what it did.

    Thread-safe: call it from a thread pool to run many sandboxes at once. Raises
    `SandboxUnavailable` when the sandbox cannot be built here (the code is then not run).
    """
    limits = limits or SandboxLimits()
    python_inside, python_env = _python_inside()
    config = {
        "code": code,
        "args": list(args),
        "limits": asdict(limits),
        "root": _root_mount_point(),
        "python": python_inside,
        "python_env": python_env,
        "binds": _read_only_binds(),
        "parent_pid": os.getpid(),
    }
    # A memfd, not a temporary file: a killed trainer leaves nothing in the temp directory.
    config_fd = os.memfd_create("sandbox-config", 0)
    status_r, status_w = os.pipe()
    try:
        os.write(config_fd, json.dumps(config).encode())
        os.lseek(config_fd, 0, os.SEEK_SET)
        process = subprocess.Popen(
            [_python_executable(), "-I", "-S", os.path.abspath(__file__), "--sandbox-init"]
            + [str(config_fd), str(status_w)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"LANG": "C.UTF-8"},
            cwd="/",
            pass_fds=(config_fd, status_w),
            start_new_session=True,
        )
        os.close(status_w)
        status_w = -1
        return _supervise(process, status_r, stdin.encode(), limits)
    finally:
        if status_w >= 0:
            os.close(status_w)
        os.close(status_r)
        os.close(config_fd)


def _supervise(
    process: subprocess.Popen, status_fd: int, stdin: bytes, limits: SandboxLimits
) -> SandboxResult:
    """Pump stdin/stdout/stderr without unbounded buffering, enforce the wall clock, and kill
    the sandbox when a limit is passed. Returns once the process tree is gone."""
    assert process.stdin and process.stdout and process.stderr
    start = time.monotonic()
    deadline = start + limits.wall_s
    cap = limits.max_output_bytes
    stdout_fd, stderr_fd = process.stdout.fileno(), process.stderr.fileno()
    out = {stdout_fd: bytearray(), stderr_fd: bytearray()}
    status = bytearray()
    timed_out = truncated = False
    kill_at: float | None = None  # set once we asked A to stop the sandbox

    sel = selectors.DefaultSelector()
    for fd in (*out, status_fd):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd = process.stdin.fileno()
    if stdin:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        process.stdin.close()
    pending = memoryview(stdin)

    def stop(now: float) -> None:
        nonlocal kill_at
        if kill_at is None:
            kill_at = now + 2.0
            _signal(process, signal.SIGTERM, group=False)  # A kills C: the namespace dies

    try:
        while sel.get_map():
            now = time.monotonic()
            if kill_at is None and now >= deadline:
                timed_out = True
                stop(now)
            if kill_at is not None and now >= kill_at:
                _signal(process, signal.SIGKILL, group=True)  # A did not answer in time
                kill_at = math.inf
            wait = (deadline if kill_at is None else min(kill_at, now + 2.0)) - now
            for key, _ in sel.select(timeout=max(wait, 0.0)):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        sent = os.write(fd, pending[:65536])
                    except (BrokenPipeError, BlockingIOError) as e:
                        sent = 0 if isinstance(e, BlockingIOError) else len(pending)
                    pending = pending[sent:]
                    if not pending:
                        sel.unregister(fd)
                        process.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                if fd == status_fd:
                    status += chunk[: max(0, 65536 - len(status))]
                    continue
                buffer = out[fd]
                room = cap - len(buffer)
                buffer += chunk[: max(room, 0)]
                if len(chunk) > room:
                    truncated = True
                    stop(time.monotonic())
        process.wait(timeout=None if kill_at is None else 5.0)
    finally:
        sel.close()
        if process.returncode is None:
            _signal(process, signal.SIGKILL, group=True)
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if not stream.closed:
                stream.close()
    wall_s = time.monotonic() - start

    report: dict = {}
    for line in bytes(status).decode(errors="replace").splitlines():
        report.update(json.loads(line))
    if "error" in report:
        raise SandboxUnavailable(f"{report['error']}; {HOW_TO_ENABLE}")
    returncode = cpu_s = max_rss_mb = None
    if "wait_status" in report:
        returncode = os.waitstatus_to_exitcode(report["wait_status"])
        cpu_s, max_rss_mb = report["cpu_s"], report["max_rss_kb"] / 1024
        # RLIMIT_CPU sends SIGXCPU at the soft limit, SIGKILL at the hard one. The code may send
        # either to itself, hence the CPU check; its margin because rusage can read under the
        # limit on a busy VM (0.94 s for a 1 s limit seen).
        if returncode in (-signal.SIGXCPU, -signal.SIGKILL) and cpu_s >= 0.9 * limits.cpu_s:
            timed_out = True
    elif kill_at is None:
        raise RuntimeError(
            f"sandbox died without reporting (exit {process.returncode}): "
            + bytes(out[stderr_fd][-2000:]).decode(errors="replace")
        )
    return SandboxResult(
        returncode=returncode,
        stdout=bytes(out[stdout_fd]).decode(errors="replace"),
        stderr=bytes(out[stderr_fd]).decode(errors="replace"),
        timed_out=timed_out,
        truncated=truncated,
        wall_s=wall_s,
        cpu_s=cpu_s or 0.0,
        max_rss_mb=max_rss_mb or 0.0,
    )


def _signal(process: subprocess.Popen, sig: int, *, group: bool) -> None:
    # Only while A is unreaped: its pid (and process group id) cannot be reused until then.
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig) if group else os.kill(process.pid, sig)


@functools.cache
def _python_executable() -> str:
    """The base interpreter (not a venv's symlink): it and its stdlib get bound into the root."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


@functools.cache
def _python_prefix() -> str | None:
    """The Python install's host directory when it lies outside SYSTEM_DIRS, else None."""
    prefix = os.path.realpath(sys.base_prefix)
    return None if any(_is_within(prefix, d) for d in SYSTEM_DIRS) else prefix


def _path_inside(host_path: str) -> str:
    """Where `host_path` (a file of the Python install or a system file) appears inside."""
    prefix = _python_prefix()
    if prefix is not None and _is_within(host_path, prefix):
        return PYTHON_INSIDE + host_path[len(prefix) :]
    return host_path


@functools.cache
def _read_only_binds() -> list[tuple[str, str]]:
    """(host path, path inside): system library directories at their own paths, the Python
    install at /python, so that its host path (/root/.pyenv/..., /home/me/...) shows in no
    command line or file name inside. An interpreter or library directory outside both (rare
    layouts) is bound at its host path."""
    binds = [(d, d) for d in SYSTEM_DIRS if os.path.lexists(d)]
    prefix = _python_prefix()
    if prefix is not None:
        binds.append((prefix, PYTHON_INSIDE))
    libdir = os.path.realpath(sysconfig.get_config_var("LIBDIR") or sys.base_prefix)
    for path in sorted({os.path.dirname(_python_executable()), libdir}):
        covered = any(_is_within(path, host) for host, _ in binds)
        if not covered and os.path.isdir(path):
            binds.append((path, path))
    return binds


@functools.cache
def _python_inside() -> tuple[str, dict[str, str]]:
    """The interpreter's path inside, and the environment it needs there.

    A shared-library build (pyenv's default) finds libpython through an absolute RUNPATH to
    its host prefix, which does not exist inside: LD_LIBRARY_PATH points at /python/lib instead.
    The interpreter finds its standard library from its own location (the `lib/pythonX.Y/os.py`
    landmark next to `bin/`), so it needs no PYTHONHOME (which `-I` would ignore anyway).
    """
    env = {}
    libdir = os.path.realpath(sysconfig.get_config_var("LIBDIR") or sys.base_prefix)
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and _path_inside(libdir) != libdir:
        env["LD_LIBRARY_PATH"] = _path_inside(libdir)
    return _path_inside(_python_executable()), env


@functools.cache
def _root_mount_point() -> str:
    """A host directory to mount the root's tmpfs over, inside the mount namespace only.

    It must not hold (or be inside) anything bound from the host, which the tmpfs would hide.
    """
    needed = [host for host, _ in _read_only_binds()] + ["/dev", "/proc", "/etc"]
    for candidate in ROOT_MOUNT_POINTS:
        real = os.path.realpath(candidate)
        clash = any(_is_within(real, p) or _is_within(p, real) for p in needed)
        if os.path.isdir(real) and not clash:
            return real
    raise SandboxUnavailable(
        f"no directory to mount the sandbox root on: each of {ROOT_MOUNT_POINTS} is missing "
        f"or holds a directory the sandbox binds from ({needed})"
    )


@functools.cache
def sandbox_available() -> tuple[bool, str]:
    """Whether `run_python` works on this machine, and if not, why (cached per process)."""
    try:
        result = run_python("print('ok')", limits=SandboxLimits(wall_s=30))
    except SandboxUnavailable as e:
        return False, str(e)
    if result.stdout != "ok\n":
        return False, f"sandbox smoke test printed {result.stdout!r}, stderr {result.stderr!r}"
    return True, ""


# ----------------------------------------------------------------------------------------------
# Sandbox side: A, C and D run the functions below (`python -I -S python.py --sandbox-init`).

_libc = None


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None):
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _report(status_fd: int, message: dict) -> None:
    os.write(status_fd, (json.dumps(message) + "\n").encode())


def _sandbox_init(cfg_fd: int, status_fd: int) -> None:
    """Process A: enter the namespaces, fork C (pid 1 inside) and wait for it."""
    global _libc
    _libc = ctypes.CDLL(None, use_errno=True)
    os.set_inheritable(status_fd, False)
    with os.fdopen(cfg_fd, "rb") as f:
        config = json.load(f)
    init_pid = 0

    def on_term(signum: int, frame: object) -> None:
        # The parent asks us to stop the run: killing pid 1 kills the whole namespace, and
        # our waitpid below returns only once the namespace is empty.
        if init_pid:
            os.kill(init_pid, signal.SIGKILL)
        else:
            os._exit(EXIT_SETUP_FAILED)

    signal.signal(signal.SIGTERM, on_term)
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != config["parent_pid"]:
            os._exit(EXIT_SETUP_FAILED)
        _enter_namespaces(status_fd)
        init_pid = os.fork()
        if init_pid == 0:
            _init_process(config, status_fd)
    except Exception as e:
        _report(status_fd, {"error": f"sandbox setup failed: {type(e).__name__}: {e}"})
        os._exit(EXIT_SETUP_FAILED)
    _, wait_status = os.waitpid(init_pid, 0)
    os._exit(os.waitstatus_to_exitcode(wait_status) & 0xFF)


def _enter_namespaces(status_fd: int) -> None:
    """unshare(2) every namespace; a helper forked beforehand (still outside) writes the maps.

    As root outside, inner 0 maps to outer 0 (C needs to read root-owned paths such as a
    Python under /root/.pyenv to bind them) and the code's uid 1000 to outer nobody: a process
    whose uid is 0 outside passes the owner checks of /proc/sysrq-trigger & co. even without
    capabilities, so the code must never run as outer 0. As an ordinary user, the only uid we
    may map is our own, and C and the code share it.
    """
    go_r, go_w = os.pipe()
    parent = os.getpid()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(go_w)
            os.read(go_r, 1)
            uid, gid = os.geteuid(), os.getegid()
            if uid == 0:
                uid_map = f"0 0 1\n{SANDBOX_UID} {NOBODY} 1\n"
                gid_map = f"0 0 1\n{SANDBOX_UID} {NOBODY} 1\n"
            else:
                uid_map, gid_map = f"{SANDBOX_UID} {uid} 1\n", f"{SANDBOX_UID} {gid} 1\n"
                with open(f"/proc/{parent}/setgroups", "w") as f:
                    f.write("deny")
            for name, text in (("uid_map", uid_map), ("gid_map", gid_map)):
                with open(f"/proc/{parent}/{name}", "w") as f:
                    f.write(text)
        except Exception as e:
            _report(status_fd, {"error": f"writing uid/gid maps failed: {e}"})
            os._exit(1)
        os._exit(0)
    os.close(go_r)
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
    flags |= CLONE_NEWUTS | CLONE_NEWCGROUP
    failed = _libc.unshare(flags)
    err = ctypes.get_errno()
    os.write(go_w, b"x")
    os.close(go_w)
    _, helper_status = os.waitpid(helper, 0)
    if failed:
        raise OSError(err, f"unshare(user|mount|pid|net|ipc|uts|cgroup): {os.strerror(err)}")
    if helper_status != 0:
        os._exit(EXIT_SETUP_FAILED)  # the helper reported why
    if os.getuid() not in (0, SANDBOX_UID):
        raise OSError("uid map not applied")


def _init_process(config: dict, status_fd: int) -> None:
    """Process C, pid 1 of the new pid namespace: build the root, then re-execute from inside it.

    The code can read /proc/1/cmdline. Forked from A, C would show A's command line (the host
    interpreter and this file's host path), so it execs `/python/bin/python -I -S /sandbox.py`
    and passes what it still needs, none of it a host path, in a memfd.
    """
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # kept across the exec (no setuid)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # pid 1 only receives signals it handles: keep none, so the code cannot stop us.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _build_root(config)
        inner = {key: config[key] for key in ("args", "limits", "python", "python_env")}
        inner_fd = os.memfd_create("sandbox-config")
        os.write(inner_fd, json.dumps(inner).encode())
        os.lseek(inner_fd, 0, os.SEEK_SET)
        os.set_inheritable(inner_fd, True)
        os.set_inheritable(status_fd, True)
        argv = [config["python"], "-I", "-S", INIT_INSIDE, "--sandbox-pid1"]
        env = {"LANG": "C.UTF-8", **config["python_env"]}
        os.execve(config["python"], argv + [str(inner_fd), str(status_fd)], env)
    except Exception as e:
        _report(status_fd, {"error": f"sandbox setup failed: {type(e).__name__}: {e}"})
        os._exit(EXIT_SETUP_FAILED)


def _pid1(config_fd: int, status_fd: int) -> None:
    """Process C after its exec, inside the root: run D, report its status, exit."""
    global _libc
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        os.set_inheritable(status_fd, False)
        with os.fdopen(config_fd, "rb") as f:
            config = json.load(f)
    except Exception as e:
        _report(status_fd, {"error": f"sandbox setup failed: {type(e).__name__}: {e}"})
        os._exit(EXIT_SETUP_FAILED)
    code_pid = os.fork()
    if code_pid == 0:
        _exec_code(config, status_fd)
    while True:
        pid, wait_status, usage = os.wait4(-1, 0)
        if pid == code_pid:
            break
    _report(
        status_fd,
        {
            "wait_status": wait_status,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_kb": usage.ru_maxrss,
        },
    )
    os._exit(0)  # the kernel now kills whatever the code left running in the namespace


def _build_root(config: dict) -> None:
    """Mount a new root over `config["root"]` (in this mount namespace only), pivot_root into it.

    The root holds: read-only binds of the system library directories and of the Python install
    (at /python), this module's source (/sandbox.py), a read-only /etc with a passwd line for
    the sandbox user, /dev with five device nodes, a size-capped tmpfs /tmp (the only writable
    place; /dev/shm is the same tmpfs) and a /proc for this pid namespace. Nothing else of the
    host exists in it.
    """
    root, limits = config["root"], config["limits"]
    with open(__file__) as f:  # before the tmpfs covers `root`, in case this file is under it
        init_source = f.read()
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    # Private to this mount namespace: the host never sees the tmpfs nor anything in it.
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=1024,mode=755")
    for source, inside in config["binds"]:
        target = root + inside
        if os.path.islink(source):  # merged /usr: /bin -> usr/bin
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(source), target)
        elif os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
            _bind_read_only(source, target)
    with open(root + INIT_INSIDE, "w") as f:
        f.write(init_source)

    os.makedirs(root + "/etc")
    for name, text in {
        "passwd": f"root:x:0:0::/:/bin/false\nsandbox:x:{SANDBOX_UID}:{SANDBOX_UID}::/tmp:/bin/false\n",
        "group": f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\n",
        "hosts": "127.0.0.1 localhost\n",
    }.items():
        with open(f"{root}/etc/{name}", "w") as f:
            f.write(text)
    if os.path.isfile("/etc/ld.so.cache"):
        open(root + "/etc/ld.so.cache", "w").close()
        _bind_read_only("/etc/ld.so.cache", root + "/etc/ld.so.cache")

    os.makedirs(root + "/dev")
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND, None)
    for name, target in {
        "fd": "/proc/self/fd",
        "stdin": "/proc/self/fd/0",
        "stdout": "/proc/self/fd/1",
        "stderr": "/proc/self/fd/2",
    }.items():
        os.symlink(target, f"{root}/dev/{name}")

    os.makedirs(root + "/tmp")
    tmp_options = f"size={limits['disk_mb']}m,nr_inodes=4096,mode=1777"
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_options)
    os.makedirs(root + "/dev/shm")
    _mount(root + "/tmp", root + "/dev/shm", None, MS_BIND, None)
    with open(root + "/tmp/main.py", "w") as f:
        f.write(config["code"])
    os.makedirs(root + "/proc")
    # Before pivot_root: the kernel allows a new procfs in a user namespace only while a
    # fully visible one is mounted. It shows this pid namespace's processes only.
    try:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        proc_mounted = True
    except OSError:
        proc_mounted = False  # some container runtimes forbid it; nothing the code needs

    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no path
    # back to the host's files (a chroot would leave one to a process holding capabilities).
    os.chdir(root)
    syscall_nr = SYS_PIVOT_ROOT.get(platform.machine())
    if syscall_nr is None:
        raise OSError(f"pivot_root syscall number unknown for {platform.machine()}")
    _check(_libc.syscall(syscall_nr, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    if proc_mounted:
        # No nested user namespaces for the code: less kernel surface to attack from inside.
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
    _libc.sethostname(b"sandbox", 7)


def _bind_read_only(source: str, target: str) -> None:
    """Bind `source` (with its submounts) at `target` and make every resulting mount read-only,
    keeping the nosuid/nodev/noexec/atime flags the kernel locks on mounts from outside."""
    _mount(source, target, None, MS_BIND | MS_REC, None)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for point in points:
        if point == target or point.startswith(target + "/"):
            fs_flags = os.statvfs(point).f_flag
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            for st, ms in (
                (os.ST_NOSUID, MS_NOSUID),
                (os.ST_NODEV, MS_NODEV),
                (os.ST_NOEXEC, MS_NOEXEC),
                (os.ST_NOATIME, MS_NOATIME),
                (os.ST_NODIRATIME, MS_NODIRATIME),
                (os.ST_RELATIME, MS_RELATIME),
            ):
                if fs_flags & st:
                    flags |= ms
            _mount(None, point, None, flags, None)


def _exec_code(config: dict, status_fd: int) -> None:
    """Process D: shed every privilege, apply the limits, exec the code's interpreter.

    `status_fd` is close-on-exec: it reports a failure to get here and is gone once the code runs.
    """
    try:
        limits = config["limits"]
        for cap in range(64):  # empty the capability bounding set
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                if ctypes.get_errno() == errno.EINVAL:
                    break
                raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
        root_outside = os.getuid() == 0
        if root_outside:  # become uid 1000 here, nobody outside
            os.setgroups([])
            os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        os.closerange(3, status_fd)
        os.closerange(status_fd + 1, 1 << 16)
        cpu = math.ceil(limits["cpu_s"])
        memory = limits["memory_mb"] << 20
        # RLIMIT_NPROC counts per (user namespace, outer uid). Root outside, the code's outer
        # uid (nobody) is its own; otherwise A and C share it and count too.
        nproc = limits["max_processes"] + (0 if root_outside else 2)
        for rlimit, value in (
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_AS, (memory, memory)),
            (resource.RLIMIT_DATA, (memory, memory)),
            (resource.RLIMIT_NPROC, (nproc, nproc)),
            (resource.RLIMIT_FSIZE, (limits["max_file_mb"] << 20,) * 2),
            (resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
            (resource.RLIMIT_MEMLOCK, (0, 0)),
            (resource.RLIMIT_MSGQUEUE, (0, 0)),
        ):
            resource.setrlimit(rlimit, value)
        os.chdir("/tmp")
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        env.update(config["python_env"])
        python = config["python"]
        os.execve(python, [python, "-I", "main.py", *config["args"]], env)
    except BaseException as e:
        _report(status_fd, {"error": f"starting the code failed: {type(e).__name__}: {e}"})
        os._exit(EXIT_SETUP_FAILED)


if __name__ == "__main__" and sys.argv[1:2] == ["--sandbox-init"]:
    _sandbox_init(int(sys.argv[2]), int(sys.argv[3]))
if __name__ == "__main__" and sys.argv[1:2] == ["--sandbox-pid1"]:
    _pid1(int(sys.argv[2]), int(sys.argv[3]))
