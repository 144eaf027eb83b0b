"""Each isolation layer on its own, with harmless code."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import threading

import pytest
from sandbox_helpers import sandbox_leftovers

import sandbox
from sandbox import ExecResult, Limits, arun, run


def test_public_api_and_result_shape() -> None:
    r = run("print(1)")
    assert isinstance(r, ExecResult)
    assert (r.stdout, r.stderr, r.exit_code, r.timed_out, r.limit, r.truncated) == ("1\n", "", 0, False, None, False)
    assert r.cpu_s >= 0 and r.peak_rss_mb > 0 and r.exec_id
    assert set(r.layers) >= {"pid_ns", "net_ns", "uid", "rlimits", "restricted", "python_net_block"}
    assert r.event_fields().keys() == {"stdout", "stderr", "exit_code", "timed_out", "limit", "cpu_s",
                                       "peak_rss_mb", "truncated"}


async def test_async_twin_runs_concurrently() -> None:
    rs = await asyncio.gather(*(arun(f"print({i} * 2)") for i in range(4)))
    assert [r.stdout for r in rs] == ["0\n", "2\n", "4\n", "6\n"]


async def test_sync_run_inside_a_running_loop() -> None:
    assert run("print('ok')").stdout == "ok\n"  # goes through a worker thread, never blocks on our loop


def test_from_config() -> None:
    from agentd.config import SandboxSection

    lim = Limits.from_config(SandboxSection(wall_s=3.0, allowed_imports=["math"], restricted=False))
    assert (lim.wall_s, lim.allowed_imports, lim.restricted, lim.user) == (3.0, ("math",), False, "nobody")


def test_own_session_and_process_group(bare: Limits) -> None:
    r = run("import os; print(os.getsid(0) == os.getpid() == os.getpgid(0))", bare)
    assert r.stdout == "True\n"
    r = run("import os; print(os.getsid(0) == os.getpid())", bare.replace(namespaces=False))
    assert r.stdout == "True\n", "without namespaces the child still leads its own session"


def test_fresh_workdir_each_run_and_removed(bare: Limits) -> None:
    code = "import os; open('mark', 'w').write('x'); print(os.getcwd()); print(sorted(os.listdir('.')))"
    for lim in (bare, bare.replace(namespaces=False)):
        r1, r2 = run(code, lim), run(code, lim)
        cwd1, cwd2 = r1.stdout.splitlines()[0], r2.stdout.splitlines()[0]
        assert cwd1 != cwd2
        assert r1.stdout.splitlines()[1] == r2.stdout.splitlines()[1] == "['mark']"  # nothing from run 1
        assert not os.path.exists(cwd1) and not os.path.exists(cwd2)


def test_rlimits_set_before_code(bare: Limits) -> None:
    lim = bare.replace(cpu_s=3.0, memory_mb=200, max_file_bytes=12345, max_open_files=40, max_processes=9)
    code = ("import resource as r\n"
            "for n in ('CPU','AS','FSIZE','NOFILE','NPROC','CORE'): print(n, *r.getrlimit(getattr(r, 'RLIMIT_' + n)))")
    r = run(code, lim)
    got = dict((ln.split()[0], tuple(map(int, ln.split()[1:]))) for ln in r.stdout.splitlines())
    nproc = 9 + (4 if r.layers["pids_cgroup"] else 0)  # the per-run cgroup is the exact cap when it applies
    assert got == {"CPU": (3, 4), "AS": (200 << 20,) * 2, "FSIZE": (12345,) * 2, "NOFILE": (40,) * 2,
                   "NPROC": (nproc,) * 2, "CORE": (0, 0)}
    assert r.layers["rlimits"]


def test_unprivileged_uid(bare: Limits) -> None:
    if os.geteuid() != 0:  # the uid drop applies when the daemon runs as root, and says so otherwise
        assert not run("pass", bare).layers["uid"]
        return
    nobody = pwd.getpwnam("nobody")
    r = run("import os; print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups())", bare)
    assert r.stdout.split(maxsplit=3) == [str(nobody.pw_uid), str(nobody.pw_uid), str(nobody.pw_gid), "[]\n"]
    assert r.layers["uid"] and r.layers["no_new_privs"]
    with pytest.raises(sandbox.SandboxError, match="no-such-user-agentd"):
        run("print(1)", bare.replace(user="no-such-user-agentd"))  # never falls back to running as root


def test_pid_namespace(bare: Limits) -> None:
    r = run("import os; print(os.getpid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))", bare)
    assert r.layers["pid_ns"] and r.layers["mount_ns"]
    assert r.stdout == "1 [1]\n", "only the code's own processes are visible"


def test_empty_environment(bare: Limits, monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox.shutdown()  # the next run starts a fork server from this process's (secret) environment
    monkeypatch.setenv("AGENTD_TEST_SECRET", "hunter2-sandbox")
    r = run("import os; print(dict(os.environ)); print(open('/proc/1/environ').read())", bare)
    assert "hunter2" not in r.stdout + r.stderr
    assert r.stdout.startswith("{}\n")


def _listener() -> tuple[socket.socket, list[object]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list[object] = []

    def accept() -> None:
        try:
            while True:
                hits.append(srv.accept())
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    return srv, hits


CONNECT = "import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')"


def test_network_namespace_blocks_loopback(bare: Limits) -> None:
    srv, hits = _listener()
    try:
        r = run(CONNECT.format(port=srv.getsockname()[1]), bare)
        assert r.layers["net_ns"] and not r.layers["python_net_block"]
        assert "connected" not in r.stdout and "OSError" in r.stderr and not hits
        r = run(CONNECT.format(port=srv.getsockname()[1]), bare.replace(network=True))
        assert r.stdout == "connected\n" and not r.layers["net_ns"], r.stderr
    finally:
        srv.close()


def test_python_level_network_block_alone(bare: Limits) -> None:
    srv, hits = _listener()
    try:
        r = run(CONNECT.format(port=srv.getsockname()[1]), bare.replace(namespaces=False))
        assert r.layers["python_net_block"] and not r.layers["net_ns"]
        assert "network is disabled" in r.stderr and not hits
    finally:
        srv.close()


def test_output_capped_and_read_concurrently(bare: Limits) -> None:
    # 200 KB to each stream, interleaved: a reader that drained one pipe at a time would deadlock.
    code = "import sys\nfor i in range(50):\n    sys.stdout.write('o' * 4000); sys.stderr.write('e' * 4000)"
    r = run(code, bare.replace(max_output_bytes=500_000))
    assert (len(r.stdout), len(r.stderr), r.truncated, r.limit) == (200_000, 200_000, False, None)
    r = run(code, bare.replace(max_output_bytes=1000))
    assert len(r.stdout) <= 1000 and len(r.stderr) <= 1000 and r.truncated and r.limit == "output"


def test_wall_clock_kills_grandchildren_without_namespaces(bare: Limits) -> None:
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
            "time.sleep(60)")
    r = run(code, bare.replace(namespaces=False, wall_s=1.0))
    assert r.timed_out and r.limit == "wall" and r.exit_code == -9
    assert r.layers["pids_cgroup"], "the cgroup is what catches a setsid() grandchild without a PID namespace"
    assert not sandbox_leftovers()


def test_restricted_policy_messages() -> None:
    r = run("print(().__class__.__bases__[0].__subclasses__())")
    assert r.limit == "policy" and '"__class__" is an invalid attribute name' in r.stderr and r.stdout == ""
    r = run("print(getattr((), '__class__'))")
    assert r.limit == "policy" and "starting with '_'" in r.stderr
    r = run("import os")
    assert r.limit == "policy" and "import of 'os' is not allowed" in r.stderr
    r = run("import math, json\nprint(math.sqrt(16), json.dumps([1]))\nfor i, c in enumerate('ab'): print(i, c)")
    assert (r.stdout, r.limit) == ("4.0 [1]\n0 a\n1 b\n", None)
    r = run("print(1 +)")
    assert r.limit is None and "SyntaxError" in r.stderr, "a syntax error is the code's, not the policy's"
    r = run("raise ValueError('boom')")
    assert r.exit_code == 1 and r.limit is None and "ValueError: boom" in r.stderr and "_runner" not in r.stderr


def test_no_state_shared_between_runs(bare: Limits) -> None:
    code = "import random, math\nmath.pi = 3\nprint(random.random())"
    lim = bare.replace(allowed_imports=("random", "math"))
    a, b = run(code, lim), run(code, lim)
    assert a.stdout and a.stdout != b.stdout, "the template's RNG state must not repeat across runs"
    assert run("import math; print(math.pi)", lim).stdout.startswith("3.14"), "a run's changes die with it"
    r = run("import math\nmath.pi = 3")
    assert r.limit is None and r.exit_code == 1 and "TypeError" in r.stderr, "restricted: module writes refused"


def test_seccomp_denies_namespace_and_mount_syscalls_but_not_threads_or_exec(bare: Limits) -> None:
    code = ("import ctypes, os, subprocess, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.unshare(0x40000000), ctypes.get_errno() == 1)\n"
            "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
            "print(subprocess.run(['/bin/echo', 'exec'], capture_output=True, text=True).stdout.strip())\n"
            "print(os.fork() if False else 'fork-ok')")
    r = run(code, bare.replace(allowed_imports=(*bare.allowed_imports, "threading")))
    assert r.layers["seccomp"], r.layers
    assert r.stdout == "-1 True\nthread\nexec\nfork-ok\n", r.stderr


def test_fork_server_restarts_after_dying() -> None:
    from sandbox import core

    run("pass")
    before = sandbox.stats()["server_starts"]
    assert core._server._proc is not None
    core._server._proc.kill()
    core._server._proc.wait()
    assert run("print('again')").stdout == "again\n"
    assert sandbox.stats()["server_starts"] == before + 1


async def test_cancelling_arun_kills_the_run(bare: Limits) -> None:
    task = asyncio.create_task(arun("import time; time.sleep(60)", bare.replace(wall_s=60.0)))
    await asyncio.sleep(0.3)
    assert sandbox_leftovers(), "the run is in flight"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if not sandbox_leftovers():
            break
        await asyncio.sleep(0.02)
    assert not sandbox_leftovers()
