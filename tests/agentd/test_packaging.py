"""The systemd unit and the service config that the README installs."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

from agentd import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "agentd.service"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    cp.read(UNIT)
    return cp


def test_unit_is_a_notify_service_with_watchdog_and_directories() -> None:
    svc = _unit()["Service"]
    assert svc["Type"] == "notify"
    assert int(svc["WatchdogSec"]) >= 10
    assert svc["StateDirectory"] == "agentd" and svc["RuntimeDirectory"] == "agentd"
    assert svc["RestartPreventExitStatus"] == "2", "a bad config (exit 2) must not restart-loop"
    assert svc["ExecStart"].split()[-1] == "start" and "--config" in svc["ExecStart"]
    for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
        assert key in svc, key


def test_unit_leaves_the_sandbox_its_namespaces_and_cgroups() -> None:
    svc = _unit()["Service"]
    assert "RestrictNamespaces" not in svc and "ProtectControlGroups" not in svc
    assert "User" not in svc, "the uid layer of the sandbox needs a root daemon"


def test_service_config_validates_with_the_units_environment() -> None:
    env = dict(word.split("=", 1) for word in _unit()["Service"]["Environment"].split())
    cfg = cfgmod.load(ROOT / "packaging" / "system.toml", environ=env)
    assert str(cfg.data_dir) == "/var/lib/agentd" and str(cfg.socket_path) == "/run/agentd/agentd.sock"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze is not installed: apt-get install -y systemd (make test does this)"
    agentd_bin = Path(sys.executable).with_name("agentd")
    unit = tmp_path / "agentd.service"
    unit.write_text(UNIT.read_text().replace("/opt/agentd/.venv/bin/agentd", str(agentd_bin)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
