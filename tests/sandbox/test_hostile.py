"""The hostile corpus: each is contained, with the right ``limit`` / ``timed_out``, and leaves nothing.

The policy layer is off here (``bare``: restricted=False and every module the attack needs) so what is
tested is the OS boundary. Process and memory bombs depend on ``bomb_guard`` (PID namespace,
unprivileged uid, per-run pids cgroup, verified with harmless code first); without it they fail
loudly instead of running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from sandbox_helpers import sandbox_leftovers

from sandbox import Limits, run

pytestmark = pytest.mark.hostile


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    deadline = time.monotonic() + 2.0
    while sandbox_leftovers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_leftovers(), "a sandboxed process outlived its run"


def test_infinite_loop_hits_cpu(bare: Limits) -> None:
    r = run("while True: pass", bare.replace(cpu_s=1.0, wall_s=10.0))
    assert r.limit == "cpu" and not r.timed_out and r.exit_code in (-signal.SIGXCPU, -signal.SIGKILL)
    assert 0.8 <= r.cpu_s <= 2.5


def test_infinite_loop_hits_wall_first_when_shorter(bare: Limits) -> None:
    r = run("while True: pass", bare.replace(cpu_s=5.0, wall_s=1.0))
    assert r.timed_out and r.limit == "wall" and r.exit_code == -signal.SIGKILL and r.wall_s < 3.0


def test_sleep_forever(bare: Limits) -> None:
    r = run("import time; time.sleep(1e9)", bare.replace(wall_s=1.0))
    assert r.timed_out and r.limit == "wall" and r.cpu_s < 0.5


def test_ignores_sigterm(bare: Limits) -> None:
    code = "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\ntime.sleep(60)"
    r = run(code, bare.replace(wall_s=1.0))
    assert r.timed_out and r.limit == "wall" and r.exit_code == -signal.SIGKILL


def test_bounded_fork_bomb(bare: Limits, bomb_guard: dict[str, bool]) -> None:
    # 200 forks at most, in the code itself: the first step before an unbounded bomb.
    code = ("import os, time\nn = 0\nfor i in range(200):\n    if os.fork() == 0:\n        time.sleep(30)\n"
            "        os._exit(0)\n    n += 1\n")
    r = run(code, bare.replace(max_processes=16, wall_s=5.0))
    assert r.limit == "processes" and "BlockingIOError" in r.stderr and not r.timed_out, r


def test_unbounded_fork_bomb(bare: Limits, bomb_guard: dict[str, bool]) -> None:
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t = time.monotonic()
    r = run(code, bare.replace(max_processes=16, wall_s=2.0, cpu_s=1.0))
    assert r.limit == "processes" and r.timed_out and time.monotonic() - t < 6.0, r
    assert run("print(1)", bare).stdout == "1\n", "the next run works"


def test_memory_bomb(bare: Limits, bomb_guard: dict[str, bool]) -> None:
    r = run("x = []\nwhile True:\n    x.append(bytearray(10 << 20))", bare.replace(memory_mb=128))
    assert r.limit == "memory" and "MemoryError" in r.stderr and r.peak_rss_mb < 140
    r = run("x = 'a' * (1 << 40)", bare.replace(memory_mb=128))
    assert r.limit == "memory"


def test_hundred_megabytes_of_output(bare: Limits) -> None:
    t = time.monotonic()
    r = run("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)",
            bare.replace(max_output_bytes=65536))
    assert r.limit == "output" and r.truncated and len(r.stdout) == 65536 and not r.timed_out
    assert time.monotonic() - t < 2.0, "killed at the cap, not drained to the end"


def test_child_outlives_parent(bare: Limits) -> None:
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint('parent exits')"
    r = run(code, bare)
    assert r.stdout == "parent exits\n" and r.exit_code == 0 and r.wall_s < 2.0
    # nothing_left_behind checks the child died with the namespace


def test_setsid_grandchild(bare: Limits) -> None:
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
            "    os._exit(0)\nprint('parent exits')")
    for lim in (bare, bare.replace(namespaces=False)):  # PID namespace; and pids cgroup alone
        r = run(code, lim)
        assert r.stdout == "parent exits\n" and r.wall_s < 2.0
        deadline = time.monotonic() + 2.0
        while sandbox_leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sandbox_leftovers()


def test_huge_file(bare: Limits) -> None:
    r = run("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 65536)", bare.replace(max_file_bytes=1 << 20))
    assert r.limit == "file_size" and not r.timed_out and "File too large" in r.stderr
    r = run("import os\nos.write(os.open('big', os.O_WRONLY | os.O_CREAT), b'x' * (2 << 20))",
            bare.replace(max_file_bytes=1 << 20))
    assert r.exit_code == 0, "a short write at the limit is the kernel's answer; nothing past it lands"
    r = run("import os\nprint(os.path.getsize('big') if os.path.exists('big') else 0)", bare)
    assert r.stdout == "0\n", "and the next run's directory is fresh"


def test_writing_outside_its_directory(bare: Limits, tmp_path) -> None:
    target = tmp_path / "daemon-data"
    target.mkdir(mode=0o777)
    target.chmod(0o777)  # even a world-writable directory of the host is out of reach
    paths = [str(target / "x"), "/tmp/agentd-sbx-escape", "/dev/shm/agentd-sbx-escape", "/etc/agentd-sbx-escape",
             os.path.join(os.getcwd(), "agentd-sbx-escape"), "../agentd-sbx-escape"]
    code = (f"import os\nfor p in {paths!r}:\n    try:\n        open(p, 'w').write('x'); print('WROTE', p)\n"
            "    except OSError as e:\n        print('refused', p, e.errno)\n")
    r = run(code, bare)
    assert "WROTE" not in r.stdout and r.stdout.count("refused") == len(paths), r.stdout
    assert not any(os.path.exists(p) for p in paths[:5])
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), "agentd-sbx-escape"))


def test_reading_the_daemons_environment(bare: Limits, monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox

    sandbox.shutdown()  # the fork server restarts from an environment holding the secret
    monkeypatch.setenv("AGENTD_SECRET_TOKEN", "s3cr3t-do-not-leak")
    code = ("import os\nprint(os.environ)\nfor p in os.listdir('/proc'):\n    try:\n"
            "        print(open('/proc/%s/environ' % p, 'rb').read())\n    except OSError:\n        pass\n"
            "print(open('/proc/%d/environ' % os.getppid() if os.getppid() else '/proc/self/environ', 'rb').read())")
    r = run(code, bare)
    assert "s3cr3t" not in r.stdout + r.stderr
    r = run(f"print(open('/proc/{os.getpid()}/environ', 'rb').read())", bare)
    assert "s3cr3t" not in r.stdout + r.stderr and r.exit_code != 0


def test_socket_to_loopback_listener(bare: Limits) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(3.0)
    accepted: list[object] = []

    def accept() -> None:
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    port = srv.getsockname()[1]
    code = (f"import socket\nfor fam, addr in ((socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_INET6, ('::1', {port}))):\n"
            "    s = socket.socket(fam)\n    s.settimeout(1)\n    try:\n        s.connect(addr); print('CONNECTED')\n"
            "    except OSError as e:\n        print('refused', e.errno)\n")
    try:
        r = run(code, bare)
        assert "CONNECTED" not in r.stdout and r.stdout.count("refused") == 2, r
        th.join(0.5)
        assert not accepted
    finally:
        srv.close()


def test_kill_parent_and_daemon(bare: Limits) -> None:
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code = (f"import os, signal\nfor pid in (os.getppid(), {victim.pid}, {os.getpid()}):\n    try:\n"
                "        os.kill(pid, signal.SIGKILL)\n        print('sent', pid)\n"
                "    except OSError as e:\n        print('refused', pid, e.errno)\n")
        r = run(code, bare)
        time.sleep(0.2)
        assert victim.poll() is None, "a host process was killed from the sandbox"
        assert f"refused {victim.pid}" in r.stdout and f"refused {os.getpid()}" in r.stdout
    finally:
        victim.kill()
        victim.wait()
    assert run("print(1)", bare).stdout == "1\n", "the fork server and supervisors survive"


def test_ctypes(bare: Limits) -> None:
    code = ("import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.setuid(0), libc.unshare(0x10000000), "
            "libc.mount(b'none', b'/', None, 0, None), libc.ptrace(16, 1, 0, 0))")
    r = run(code, bare)
    assert r.stdout == "-1 -1 -1 -1\n", "no privilege to regain; no user namespace, mount or ptrace (seccomp)"
    assert r.layers["seccomp"]
    r = run("import ctypes\nctypes.string_at(0)", bare)
    assert r.exit_code == -signal.SIGSEGV and r.limit is None


def test_subclasses_style_escapes_under_policy() -> None:
    escapes = [
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0]",
        "getattr(getattr((), '__class__'), '__base__')",
        "'{0.__class__.__base__}'.format(1)",
        "(x for x in ()).gi_frame.f_back.f_globals",
        "type(1).mro()[-1].__subclasses__()",
        "__import__('os').system('id')",
        "import os\nos.system('id')",
        "exec('import os')",
        "eval('1')",
        "open('/etc/passwd').read()",
        "globals()",
    ]
    for code in escapes:
        r = run(code)
        assert r.exit_code != 0 and r.stdout == "", code
        assert r.limit == "policy" or "NameError" in r.stderr, (code, r.stderr)


def test_etc_shadow(bare: Limits) -> None:
    r = run("print(open('/etc/shadow').read())", bare)
    assert r.stdout == "" and "Permission denied" in r.stderr


def test_daemon_side_stays_responsive_during_hostile_runs(bare: Limits) -> None:
    """While a CPU burner and a sleeper run, the calling process keeps its own loop ticking."""
    import asyncio

    from sandbox import arun

    async def main() -> float:
        worst = 0.0
        task = asyncio.gather(arun("while True: pass", bare.replace(wall_s=1.5)),
                              arun("import time; time.sleep(1e9)", bare.replace(wall_s=1.5)))
        while not task.done():
            t = time.monotonic()
            await asyncio.sleep(0.01)
            worst = max(worst, time.monotonic() - t)
        rs = await task
        assert all(r.timed_out for r in rs)
        return worst

    assert asyncio.run(main()) < 0.5
