"""Sandbox fork server, per-run supervisor and child bootstrap.

Started by sandbox.core as ``python -I -B -S _runner.py SITE_DIR PRELOAD`` with an empty environment
and one end of a SOCK_SEQPACKET pair on stdin. ``-I`` puts nothing of agentd on ``sys.path``, so this
file is self-contained: stdlib plus RestrictedPython (from SITE_DIR, appended explicitly).

Process tree of one run::

    fork server (template: interpreter + RestrictedPython + preloaded modules already imported)
      └─ supervisor      (forked per run; trusted; host PID namespace; owns the wall clock)
           └─ child      (PID 1 of a fresh PID namespace; own session, mount and network namespace;
                          read-only root, private tmpfs working dir, rlimits, unprivileged uid,
                          then the policy layer and the user's code)

The template never runs user code and never changes after start, so runs share nothing: each child
is a fresh fork of the same untouched image (the ``random`` module is reseeded in every child).
Results cross as JSON lines on a per-run socket, never pickle.
"""

import builtins
import ctypes
import errno
import fcntl
import io
import json
import linecache
import os
import pwd
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

sys.path.append(sys.argv[1])

from RestrictedPython import (  # noqa: E402  (needs the site dir appended above)
    compile_restricted_exec,
    limited_builtins,
    safe_builtins,
    utility_builtins,
)
from RestrictedPython.Guards import (  # noqa: E402
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safer_getattr,
)

# Imported once in the template. encodings.idna is imported lazily by socket name resolution; the
# interpreter's files may be unreadable to the sandbox uid (e.g. a pyenv under /root), so load it here.
PRELOAD = [m for m in sys.argv[2].split(",") if m] if len(sys.argv) > 2 else []
for _name in [*PRELOAD, "encodings.idna"]:
    try:
        __import__(_name)
    except Exception:  # a module that fails to import here is imported (and fails) in the run
        pass

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # same number on every architecture that has it
PR_SET_NO_NEW_PRIVS = 38
RESULT_FD = 3
CGROUP_BASES = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")  # v1 pids hierarchy, else v2 unified

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), f"mount {target}")


def _ro_root() -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)), "mount_setattr")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# seccomp: a deny-list of the syscalls an escape would start from (new namespaces, mounts, ptrace,
# kernel modules, bpf, io_uring, keyrings...). x86_64 only; elsewhere the layer is reported absent.
_SECCOMP_DENY_X86_64 = (
    272, 308, 165, 166, 155, 442, 428, 429, 430, 431, 432, 433,  # unshare setns mount umount2 pivot_root new-mount API
    101, 246, 320, 175, 313, 176, 321, 298, 323, 250, 248, 249,  # ptrace kexec modules bpf perf userfaultfd keys
    425, 426, 427, 161, 167, 168, 169, 163, 135, 310, 311, 312, 434, 424,  # io_uring chroot swap reboot acct
    # personality process_vm_* kcmp pidfd_open pidfd_send_signal
)
_CLONE_NS_FLAGS = 0x7E020000  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
AUDIT_ARCH_X86_64 = 0xC000003E


def _seccomp_deny() -> None:
    import platform

    if platform.machine() != "x86_64":
        raise OSError(errno.ENOSYS, "seccomp filter is written for x86_64 only")
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    allow, kill = 0x7FFF0000, 0x80000000
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH_X86_64), (ret, 0, 0, kill),  # foreign ABI: kill
            (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm),  # x32 ABI numbers
            (jeq, 0, 1, 435), (ret, 0, 0, enosys)]  # clone3: flags unreadable here; libc falls back to clone
    for nr in _SECCOMP_DENY_X86_64:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 3, 56), (ld, 0, 0, 16), (jset, 0, 1, _CLONE_NS_FLAGS), (ret, 0, 0, eperm), (ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    arr = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    fprog = Prog(len(prog), arr)
    _check(_libc.prctl(22, 2, ctypes.byref(fprog), 0, 0), "seccomp")  # PR_SET_SECCOMP, MODE_FILTER


# ---------------------------------------------------------------------------------------------------
# fork server


def serve(chan: socket.socket) -> None:
    """Fork one supervisor per request; exit when the daemon's end closes."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C at the daemon's terminal is the daemon's business
    chan.send(json.dumps({"ready": True, "pid": os.getpid(), "root": os.geteuid() == 0}).encode())
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(chan, 256, 4)
        except InterruptedError:
            continue
        except OSError:
            return
        if not msg:
            return
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                chan.close()
                supervise(*fds)
                code = 0
            except BaseException as exc:  # noqa: BLE001 - a supervisor must never fall back into the server loop
                try:  # tell the daemon why (it raises SandboxError); the code did not run
                    msg = json.dumps({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
                    os.write(fds[0], (msg + "\n").encode())
                except OSError:
                    traceback.print_exc()
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------------------------------
# supervisor


def _read_request(ctrl: socket.socket) -> dict:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = ctrl.recv(1 << 16)
        if not chunk:
            raise EOFError("daemon closed before sending the request")
        buf += chunk
        if len(buf) > 64 << 20:
            raise ValueError("request too large")
    return json.loads(buf[: buf.index(b"\n")])


def _make_cgroup(run_id: str, max_processes: int) -> str | None:
    """A per-run pids cgroup (root only): the hard cap on tasks, forks past it fail with EAGAIN."""
    for base in CGROUP_BASES:
        if not os.path.exists(os.path.join(base, "cgroup.procs")):
            continue
        if base == "/sys/fs/cgroup" and not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            continue
        try:
            parent = os.path.join(base, "agentd-sandbox")
            os.makedirs(parent, exist_ok=True)
            if base == "/sys/fs/cgroup":  # v2: the controller must be enabled for children
                try:
                    _write(os.path.join(parent, "cgroup.subtree_control"), "+pids")
                except OSError:
                    pass
            path = os.path.join(parent, run_id)
            os.mkdir(path)
            try:
                _write(os.path.join(path, "pids.max"), str(max_processes))
            except OSError:
                os.rmdir(path)
                continue
            return path
        except OSError:
            continue
    return None


def _cgroup_kill_all(path: str) -> int:
    """SIGKILL every task left in the cgroup (the setsid()-escapee catcher without a PID namespace)."""
    killed = 0
    for _ in range(200):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            return killed
        if not pids:
            return killed
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    return killed


def _cgroup_hits(path: str) -> int:
    try:
        with open(os.path.join(path, "pids.events")) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == "max":
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_remove(path: str) -> None:
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            _cgroup_kill_all(path)
            time.sleep(0.01)


def supervise(ctrl_fd: int, out_fd: int, err_fd: int) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # SIG_IGN (inherited) would make wait4 fail
    ctrl = socket.socket(fileno=ctrl_fd)
    req = _read_request(ctrl)
    lim = req["limits"]
    run_id = str(req["run_id"])
    is_root = os.geteuid() == 0
    layers = {"session": True, "pid_ns": False, "net_ns": False, "mount_ns": False, "ro_root": False,
              "private_tmp": False, "uid": False, "no_new_privs": False, "rlimits": False,
              "seccomp": False, "pids_cgroup": False, "restricted": bool(lim["restricted"]), "python_net_block": False}

    uid = gid = None
    if is_root:
        pw = pwd.getpwnam(lim["user"])  # KeyError: unknown user -> the run fails, code never runs as root
        uid, gid = pw.pw_uid, pw.pw_gid
        if uid == 0:
            raise ValueError(f"sandbox user {lim['user']!r} is root")

    if lim["namespaces"]:
        try:
            if is_root:
                _unshare(CLONE_NEWPID)
            else:
                # Unprivileged: a user namespace owning the PID namespace gives the child the right to
                # mount and unshare further; we map our own uid/gid only (no privilege on the host).
                ouid, ogid = os.getuid(), os.getgid()
                _unshare(CLONE_NEWUSER | CLONE_NEWPID)
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"{ouid} {ouid} 1")
                _write("/proc/self/gid_map", f"{ogid} {ogid} 1")
            layers["pid_ns"] = True
        except OSError:
            pass

    cgroup = _make_cgroup(run_id, int(lim["max_processes"])) if is_root else None
    workdir = tempfile.mkdtemp(prefix="agentd-sbx-")
    if uid is not None:
        os.chown(workdir, uid, gid)
    res_r, res_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(res_r)
        ctrl.close()
        _child(lim, req["code"], layers, uid, gid, workdir, cgroup, out_fd, err_fd, res_w)  # never returns
    os.close(res_w)
    os.close(out_fd)
    os.close(err_fd)
    ctrl.sendall((json.dumps({"event": "started", "pid": pid}) + "\n").encode())

    reason = None
    res_buf = bytearray()
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    for fd in (pidfd, ctrl.fileno(), res_r):
        poller.register(fd, select.POLLIN)
    deadline = t0 + float(lim["wall_s"])
    exited = False
    while not exited:
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "wall"
            break
        for fd, _ev in poller.poll(max(1, int(left * 1000))):
            if fd == pidfd:
                exited = True
            elif fd == res_r:
                chunk = os.read(res_r, 65536)
                if not chunk:
                    poller.unregister(res_r)
                elif len(res_buf) < 1 << 20:
                    res_buf += chunk
            elif fd == ctrl.fileno():
                data = ctrl.recv(4096)
                try:
                    reason = json.loads(data).get("kill", "killed") if data else "hangup"
                except ValueError:
                    reason = "killed"
                exited = True
    if reason is not None:
        try:
            os.kill(pid, signal.SIGKILL)  # with a PID namespace this kills everything in it
        except ProcessLookupError:
            pass
    _, status, ru = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    os.close(pidfd)
    if not layers["pid_ns"]:
        try:
            os.killpg(pid, signal.SIGKILL)  # leftovers in the child's process group
        except (ProcessLookupError, PermissionError):
            pass
    cg_hits = 0
    if cgroup:
        _cgroup_kill_all(cgroup)  # also catches setsid() escapees when there is no PID namespace
        cg_hits = _cgroup_hits(cgroup)
    # The result pipe: the child wrote it before exiting; a leftover holder (no PID namespace) must not
    # hold us up, so read with a short deadline.
    end = time.monotonic() + 0.2
    os.set_blocking(res_r, False)
    while time.monotonic() < end and len(res_buf) < 1 << 20:
        r, _, _ = select.select([res_r], [], [], max(0.0, end - time.monotonic()))
        if not r:
            break
        chunk = os.read(res_r, 65536)
        if not chunk:
            break
        res_buf += chunk
    os.close(res_r)
    shutil.rmtree(workdir, ignore_errors=True)  # before the report: when run() returns it is gone

    child_info: dict = {}
    for line in res_buf.decode("utf-8", "replace").splitlines():  # set-up line, then the final one
        try:
            info = json.loads(line)
        except ValueError:
            continue
        if isinstance(info, dict):
            child_info.update(info)
            layers.update({k: bool(v) for k, v in info.get("layers", {}).items() if k in layers})
    cpu = ru.ru_utime + ru.ru_stime
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        exit_code = -sig
    else:
        sig = 0
        exit_code = os.WEXITSTATUS(status)
    limit = None
    timed_out = reason == "wall"
    if cg_hits > 0 and reason != "output":
        limit = "processes"  # a fork bomb spins against pids.max until the wall or CPU clock ends it
    elif reason in ("wall", "output"):
        limit = reason
    elif reason is not None:
        limit = None  # the daemon went away or cancelled: no limit of the code
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= int(lim["cpu_soft"]) - 0.05):
        limit = "cpu"
    elif sig == signal.SIGXFSZ:
        limit = "file_size"
    else:
        limit = child_info.get("limit")
    out = {"event": "exit", "exit_code": exit_code, "timed_out": timed_out, "limit": limit,
           "cpu_s": round(cpu, 4), "peak_rss_mb": round(ru.ru_maxrss / 1024.0, 2), "wall_s": round(wall, 4),
           "layers": layers, "killed": reason}
    try:
        ctrl.sendall((json.dumps(out) + "\n").encode())
    except OSError:
        pass
    ctrl.close()
    # After the report, off the caller's critical path: an emptied cgroup can take a few milliseconds
    # to become removable.
    if cgroup:
        _cgroup_remove(cgroup)


# ---------------------------------------------------------------------------------------------------
# child: isolate, limit, drop, then run the code. Any failure before the code runs exits 71 without
# running it (never run user code with a layer that was required but failed).


def _child(lim: dict, code: str, layers: dict, uid: int | None, gid: int | None, workdir: str,
           cgroup: str | None, out_fd: int, err_fd: int, res_w: int) -> None:
    try:
        os.setsid()
        # Lift the three fds above any low number first so the dup2s below cannot clobber each other.
        hi_out, hi_err, hi_res = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in (out_fd, err_fd, res_w))
        os.dup2(hi_out, 1)
        os.dup2(hi_err, 2)
        os.dup2(hi_res, RESULT_FD)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.closerange(RESULT_FD + 1, 1 << 16)  # nothing of the server (its channel) reaches the code
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if cgroup:
            _write(os.path.join(cgroup, "cgroup.procs"), "0")
            layers["pids_cgroup"] = True
        if lim["namespaces"]:
            _isolate_fs_and_net(lim, layers, uid, gid, workdir)
        os.chdir(workdir)
        _set_rlimits(lim, nproc_headroom=4 if layers["pids_cgroup"] else 0)
        layers["rlimits"] = True
        try:
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
            layers["no_new_privs"] = True  # setuid binaries cannot give privileges back
        except OSError:
            pass
        # Allowed modules are imported while we can still read every file of the interpreter: a uid
        # drop can make the stdlib unreadable (an interpreter under /root). Import-time code is trusted.
        for name in lim["allowed_imports"]:
            if name not in sys.modules:
                try:
                    __import__(name)
                except Exception:  # noqa: BLE001 - the code's own import reports it
                    pass
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            if os.getuid() == 0 or os.geteuid() == 0:
                raise PermissionError("uid drop did not take")
            layers["uid"] = True
        try:
            _seccomp_deny()  # last: our own set-up above needed mount/unshare
            layers["seccomp"] = True
        except OSError:
            pass
    except BaseException as exc:  # noqa: BLE001
        try:
            os.write(2, f"sandbox: set-up failed, code not run: {exc}\n".encode())
            os.write(RESULT_FD, (json.dumps({"layers": layers, "setup_error": str(exc)}) + "\n").encode())
        finally:
            os._exit(71)
    _run_user_code(lim, code, layers)


def _isolate_fs_and_net(lim: dict, layers: dict, uid: int | None, gid: int | None, workdir: str) -> None:
    flags = CLONE_NEWNS | (0 if lim["network"] else CLONE_NEWNET)
    try:
        _unshare(flags)
        layers["mount_ns"] = True
        layers["net_ns"] = not lim["network"]
    except OSError:
        try:
            _unshare(CLONE_NEWNS)
            layers["mount_ns"] = True
        except OSError:
            pass
        if not lim["network"]:
            try:
                _unshare(CLONE_NEWNET)
                layers["net_ns"] = True
            except OSError:
                pass
    if not layers["mount_ns"]:
        return
    _mount("none", "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    if layers["pid_ns"]:
        # /proc of our own PID namespace: the daemon's processes, cmdlines and environ are not listed.
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    try:
        _ro_root()
        layers["ro_root"] = True
    except OSError:
        pass
    size = max(4 << 20, 4 * int(lim["max_file_bytes"]))
    opts = f"size={size},mode=0700,nr_inodes=4096"
    if uid is not None:
        opts += f",uid={uid},gid={gid}"
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    layers["private_tmp"] = True


def _set_rlimits(lim: dict, nproc_headroom: int = 0) -> None:
    """RLIMIT_NPROC counts every process of the uid host-wide; with a per-run pids cgroup (the exact
    cap, which also tells us it was hit) it is only a backstop and gets a little headroom."""
    soft = int(lim["cpu_soft"])
    mem = int(lim["memory_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))  # SIGXCPU first, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(lim["max_file_bytes"]),) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(lim["max_open_files"]),) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (int(lim["max_processes"]) + nproc_headroom,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))


# ---------------------------------------------------------------------------------------------------
# policy layer and execution


class PolicyError(Exception):
    """A construct the sandbox policy refuses (raised into the user's code)."""


class ImportRefused(PolicyError, ImportError):
    pass


_refused: list[str] = []


def _refuse(message: str, cls: type = PolicyError) -> BaseException:
    _refused.append(message)
    return cls(f"sandbox policy: {message}")


def _make_import(allowed: frozenset):
    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level != 0 or top not in allowed:
            shown = ", ".join(sorted(allowed)) or "none"
            raise _refuse(f"import of {name!r} is not allowed (allowed: {shown})", ImportRefused)
        return real_import(name, globals, locals, fromlist, level)

    return guarded_import


def _guarded_getattr(obj, name, default=None, getattr=getattr):
    # safer_getattr refuses "_"-names, frame/traceback/generator internals and str.format; we turn its
    # refusal into a PolicyError so the result says limit "policy" and the message is explicit.
    if isinstance(name, str) and name.startswith("_"):
        raise _refuse(f"access to attribute {name!r} is refused (names starting with '_' are not allowed)")
    try:
        return safer_getattr(obj, name, default, getattr)
    except NotImplementedError as exc:
        raise _refuse(str(exc)) from None
    except AttributeError as exc:
        if "restricted name" in str(exc):
            raise _refuse(str(exc)) from None
        raise


class _Print:
    """RestrictedPython's ``_print_`` protocol, writing to the real stdout (not a collector)."""

    def __init__(self, _getattr_=None):
        pass

    def _call_print(self, *objects, **kwargs):
        print(*objects, **kwargs)


def _restricted_globals(allowed: frozenset) -> dict:
    b = dict(safe_builtins)
    b.update(limited_builtins)
    b.update(utility_builtins)
    for name in ("all", "any", "sum", "min", "max", "sorted", "reversed", "enumerate", "zip", "map",
                 "filter", "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "iter",
                 "next", "format", "hasattr", "type", "object", "staticmethod", "classmethod", "property",
                 "super", "print", "StopAsyncIteration"):
        b[name] = getattr(builtins, name)
    for name in ("string", "math", "random", "whrandom", "same_type", "test", "reorder"):
        b.pop(name, None)  # modules come through import, on the allow-list only
    b["getattr"] = _guarded_getattr
    b["type"] = lambda obj: type(obj)  # one-argument type(): no class creation with type(name, bases, ns)
    b["__import__"] = _make_import(allowed)
    return {
        "__builtins__": b,
        "__name__": "__main__",
        "__metaclass__": type,
        "_getattr_": _guarded_getattr,
        "_getitem_": lambda obj, key: obj[key],
        "_getiter_": iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_write_": full_write_guard,
        "_print_": _Print,
        "_apply_": lambda f, *a, **kw: f(*a, **kw),
        "_inplacevar_": _inplacevar,
    }


def _inplacevar(op: str, x, y):
    import operator

    ops = {"+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
           "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
           ">>=": operator.irshift, "&=": operator.iand, "|=": operator.ior, "^=": operator.ixor,
           "@=": operator.imatmul}
    if op not in ops:
        raise _refuse(f"in-place operator {op} is not allowed")
    return ops[op](x, y)


def _block_python_network() -> None:
    """Fallback when there is no network namespace: refuse sockets other than AF_UNIX from Python."""
    import _socket

    def make(base: type) -> type:
        class BlockedSocket(base):
            def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
                if fileno is None and family != socket.AF_UNIX:
                    raise PermissionError(errno.EACCES, "sandbox: network is disabled")
                super().__init__(family, type, proto, fileno)

        return BlockedSocket

    socket.socket = make(socket.socket)
    _socket.socket = _socket.SocketType = make(_socket.socket)


def _classify(exc: BaseException) -> str | None:
    if isinstance(exc, PolicyError):
        return "policy"
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError):
        if exc.errno == errno.EFBIG:
            return "file_size"
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return "open_files"
        if exc.errno == errno.EAGAIN and isinstance(exc, BlockingIOError) and exc.filename is None:
            return "processes"
    return None


def _print_user_traceback(exc: BaseException) -> None:
    """The traceback of the user's frames only: the runner's own frames are noise to the model."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<exec>"]
    text = "".join(traceback.format_list(frames)) if frames else ""
    sys.stderr.write("Traceback (most recent call last):\n" + text if text else "")
    sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))


def _run_user_code(lim: dict, code: str, layers: dict) -> None:
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.argv = ["<exec>"]
    os.environ.clear()  # the interpreter's own locale coercion put LC_CTYPE there; the code gets nothing
    if "random" in sys.modules:
        sys.modules["random"].seed()  # the template's seed must not repeat across runs
    if not lim["network"] and not layers["net_ns"]:
        _block_python_network()
        layers["python_net_block"] = True
    # Report the layers before the code runs: a run killed by a limit writes nothing at the end.
    os.write(RESULT_FD, (json.dumps({"layers": layers}) + "\n").encode())
    allowed = frozenset(lim["allowed_imports"])
    linecache.cache["<exec>"] = (len(code), None, code.splitlines(True), "<exec>")
    exit_code, limit = 0, None
    try:
        compiled = compile(code, "<exec>", "exec", dont_inherit=True)
        if lim["restricted"]:
            res = compile_restricted_exec(code, "<exec>")
            if res.errors:
                _refused.extend(res.errors)
                raise PolicyError("sandbox policy refused this code:\n  " + "\n  ".join(res.errors))
            glb = _restricted_globals(allowed)
            compiled = res.code
        else:
            bt = dict(vars(builtins))
            bt["__import__"] = _make_import(allowed)
            glb = {"__builtins__": bt, "__name__": "__main__"}
        exec(compiled, glb)
    except SystemExit as exc:
        c = exc.code
        exit_code = c if isinstance(c, int) else (0 if c is None else 1)
        if not isinstance(c, int | None):
            print(c, file=sys.stderr)
    except SyntaxError as exc:
        sys.stderr.write("".join(traceback.format_exception_only(type(exc), exc)))
        exit_code = 1
    except BaseException as exc:  # noqa: BLE001 - everything the code raises is its result
        limit = _classify(exc)
        exit_code = 1
        try:
            if limit == "policy" and not isinstance(exc, ImportRefused) and exc.__traceback__ is not None \
                    and str(exc).startswith("sandbox policy refused"):
                sys.stderr.write(str(exc) + "\n")
            else:
                _print_user_traceback(exc)
        except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed pipe (output limit) is not our problem here
            pass
    try:
        info = {"layers": layers, "limit": limit, "refused": _refused[:5]}
        os.write(RESULT_FD, (json.dumps(info) + "\n").encode())
    except BaseException:  # noqa: BLE001
        pass
    os._exit(exit_code & 0xFF)


if __name__ == "__main__":
    serve(socket.socket(fileno=0))
