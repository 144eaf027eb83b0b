"""The three seed backbones added last (astarte, spiral, agiformer) train with models.train's Trainer on the
agent curriculum (what ``agentd train --backbone NAME`` runs): a few dozen steps on the tiny preset lower
the loss, the checkpoint loads back with the same logits, and a real daemon serves a chat turn with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import models
from models.data import AgentCurriculum
from models.train import TrainConfig, Trainer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["astarte", "spiral", "agiformer"])
def test_a_few_dozen_steps_lower_the_loss_and_the_daemon_runs_it(name: str, tmp_path: Path, daemon_factory: Any) -> None:
    cfg = TrainConfig(backbone=name, preset="tiny", steps=36, batch_size=4, seq_len=96, stream_chunks=2, lr=3e-3,
                      warmup=4, threads=1, checkpoint_every=1000, log_every=1, stages=(0.3, 0.4, 0.3))
    rows: list[dict[str, float]] = []
    result = Trainer(cfg, AgentCurriculum(seed=0), tmp_path / "ckpt", on_log=rows.append).run(progress=False)
    assert result.skipped_steps == 0 and len(rows) == 36
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5  # single rows are noisy
    assert last < 0.7 * first, [r["loss"] for r in rows]

    model = models.load_checkpoint(tmp_path / "ckpt", expect=name)
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        again, _ = model(tokens, model.init_state(1))
        trained = Trainer(cfg, AgentCurriculum(seed=0), tmp_path / "ckpt").model.eval()  # resumes from the checkpoint
        ref, _ = trained(tokens, trained.init_state(1))
    assert torch.equal(again, ref)

    d = daemon_factory(backbone={"name": name, "checkpoint": str(tmp_path / "ckpt"), "max_tokens": 16})

    events = d.chat("hello")
    assert events[-1]["event"] == "done", events
    st = d.request("status")
    assert st["backbone"] == name and st["weights"] == str(tmp_path / "ckpt"), st
    assert d.stop() == 0
