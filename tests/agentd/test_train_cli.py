"""``agentd train`` / ``agentd eval`` and the shipped default checkpoint, end to end.

A tiny model trained for a few dozen steps must lower its loss and load into a real daemon; the
shipped default, in a real daemon with the real sandbox, must answer an arithmetic question over
the socket by EXEC and then SPEAK the right number.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from agentd.daemon import BUNDLED_CHECKPOINTS
from tests.conftest import AGENTD

SHIPPED = BUNDLED_CHECKPOINTS / "nexus"


def _speak(events: list[dict[str, Any]]) -> str:
    return "".join(ev["text"] for ev in events if ev["event"] == "speak" and ev.get("end"))


@pytest.mark.slow
def test_tiny_training_lowers_the_loss_and_the_checkpoint_runs_in_the_daemon(tmp_path: Path, daemon_factory: Any) -> None:
    out = tmp_path / "ckpt"
    r = subprocess.run([AGENTD, "train", "--backbone", "nexus", "--preset", "tiny", "--steps", "40", "--batch-size", "8",
                        "--seq-len", "128", "--warmup", "5", "--threads", "1", "--checkpoint-every", "20",
                        "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert summary["steps"] == 40 and summary["skipped_steps"] == 0
    # the mean of the last logged losses is well under the first (single rows are noisy)
    assert sum(r["loss"] for r in rows[-3:]) / 3 < 0.8 * rows[0]["loss"], rows
    assert "tok/s" in r.stderr and "loss" in r.stderr
    assert {"model.safetensors", "config.json", "optimizer.safetensors"} <= {p.name for p in out.iterdir()}

    # run again: already done, nothing retrained
    again = subprocess.run([AGENTD, "train", "--backbone", "nexus", "--preset", "tiny", "--steps", "40", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already trained" in again.stderr

    d = daemon_factory(backbone={"name": "nexus", "checkpoint": str(out), "max_tokens": 32})
    st = d.request("status")
    assert st["backbone"] == "nexus" and st["weights"] == str(out), st
    events = d.chat("hello")
    assert events[-1]["event"] == "done" and events[-1]["result"]["turn"] >= 1
    assert d.stop() == 0


def test_train_and_eval_refuse_bad_arguments_clearly(tmp_path: Path) -> None:
    r = subprocess.run([AGENTD, "train", "--backbone", "nosuch", "--out", str(tmp_path / "x")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "unknown backbone 'nosuch'" in r.stderr
    r = subprocess.run([AGENTD, "train", "--weights", "juggling=2", "--out", str(tmp_path / "x")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "juggling=2" in r.stderr
    r = subprocess.run([AGENTD, "eval", "--checkpoint", str(tmp_path / "missing")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "not a checkpoint directory" in r.stderr
    r = subprocess.run([AGENTD, "eval", "--exec-temperature", "-1", "--episodes", "1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "backbone.exec_temperature: must be >= 0" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([AGENTD, "train", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--steps" in r.stdout and "resumes" in r.stdout


def test_the_default_checkpoint_ships_small_and_is_the_configured_default() -> None:
    from agentd import config as cfgmod

    assert (SHIPPED / "config.json").exists() and (SHIPPED / "model.safetensors").exists()
    assert (SHIPPED / "model.safetensors").stat().st_size < 50 * 2**20
    assert not (SHIPPED / "optimizer.safetensors").exists()
    cfg = cfgmod.load(Path(__file__).resolve().parents[2] / "config.toml", environ={})
    assert cfg.backbone.name == "nexus" and cfg.backbone.checkpoint == ""
    assert cfgmod.load(None, environ={}).backbone.name == "nexus"


@pytest.mark.slow
def test_shipped_default_answers_arithmetic_by_exec_over_the_socket(daemon_factory: Any) -> None:
    # No [backbone] name or checkpoint: what a user gets out of the box (sandbox on, memory off for speed).
    d = daemon_factory({"sandbox": {"enabled": True}}, backbone={})
    st = d.request("status")
    assert st["backbone"] == "nexus" and st["weights"] == str(SHIPPED), st
    events = d.chat("what is 347 + 1286?")
    kinds = [ev["event"] for ev in events]
    assert "exec" in kinds and "exec_result" in kinds, events
    assert kinds.index("exec") < kinds.index("exec_result") < max(i for i, k in enumerate(kinds) if k == "speak")
    result = next(ev for ev in events if ev["event"] == "exec_result")
    assert result["exit_code"] == 0 and result["stdout"].strip() == "1633", result
    assert "1633" in _speak(events), events
    assert events[-1]["event"] == "done" and events[-1]["result"]["reason"] == "wait"
    assert d.stop() == 0


@pytest.mark.slow
def test_eval_runs_held_out_episodes_through_the_loop_and_reports_per_skill(tmp_path: Path) -> None:
    cfg = tmp_path / "agentd.toml"
    cfg.write_text(f'[daemon]\ndata_dir = "{tmp_path / "data"}"\nrun_dir = "{tmp_path / "run"}"\n')
    r = subprocess.run([AGENTD, "--config", str(cfg), "eval", "--episodes", "2", "--skills", "arithmetic,calm", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["checkpoint"] == str(SHIPPED) and report["episodes"] == 4
    assert set(report["skills"]) == {"arithmetic", "calm"}
    assert report["skills"]["arithmetic"]["n"] == 2 and report["well_formed"]["n"] == 4
    assert report["temperature"] == 0.7 and report["exec_temperature"] == 0.0  # the shipped sampling
    text = subprocess.run([AGENTD, "--config", str(cfg), "eval", "--episodes", "1", "--skills", "calm"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "protocol well-formed" in text.stdout and "silence when calm" in text.stdout
