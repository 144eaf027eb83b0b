"""The daemon's memory service in-process, with the real store and the real MiniLM: socket ops and
their error codes, what the loop remembers, recall into a MEM observation within its token budget,
snapshots at PAUSE restored at start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from agentd import config as config_mod
from agentd.memory_service import MemoryOpError, MemoryService
from memory_store import default_embedder
from models.base import state_digest
from models.tokenizer import DEFAULT as TOK
from models.tokenizer import ID

TINY = dict(d_model=32, n_layers=2, filter_len=16, short_kernel=3, window=8, n_heads=2, attn_every=2, mem_every=1, mem_slots=4)


@pytest.fixture(scope="module", autouse=True)
def _model_once() -> None:
    default_embedder()  # load the shared MiniLM once for the module


def make_config(tmp_path: Path, **memory: object) -> config_mod.Config:
    cfg = config_mod.from_dict({"daemon": {"data_dir": str(tmp_path)}, "memory": memory})
    return cfg


async def test_socket_ops_and_their_errors(tmp_path: Path) -> None:
    async with MemoryService(make_config(tmp_path)) as mem:
        r = await mem.handle("memory.add", {"text": "the spare key is under the blue flowerpot", "meta": {"by": "alice"}})
        assert r == {"memory_id": 1, "duplicate": False}
        assert await mem.handle("memory.add", {"text": "the spare key is under the blue  flowerpot"}) == {"memory_id": 1, "duplicate": True}
        res = (await mem.handle("memory.search", {"query": "where is the spare key?", "k": 3}))["results"]
        assert res[0]["memory_id"] == 1 and res[0]["meta"] == {"by": "alice"} and 0 < res[0]["score"] <= 1
        assert set(res[0]) >= {"memory_id", "text", "score", "time"}
        assert (await mem.handle("memory.stats", {}))["memories"] == 1
        for op, req, code in [
            ("memory.add", {}, "missing_field"),
            ("memory.add", {"text": "  "}, "bad_field"),
            ("memory.add", {"text": "x", "meta": [1]}, "bad_field"),
            ("memory.add", {"text": "x", "meta": {"f": float("nan")}}, "bad_field"),
            ("memory.search", {}, "missing_field"),
            ("memory.search", {"query": "x", "k": 0}, "bad_field"),
            ("memory.search", {"query": "x", "k": "3"}, "bad_field"),
        ]:
            with pytest.raises(MemoryOpError) as ei:
                await mem.handle(op, req)
            assert ei.value.code == code, (op, req)
        status = await mem.status()
        assert status["enabled"] and status["memories"] == 1 and status["index"] == "flat"


async def test_disabled_memory_answers_unavailable(tmp_path: Path) -> None:
    async with MemoryService(make_config(tmp_path, enabled=False)) as mem:
        with pytest.raises(MemoryOpError) as ei:
            await mem.handle("memory.add", {"text": "x"})
        assert ei.value.code == "unavailable"
        mem.remember("speak", "nothing happens")
        assert await mem.recall_tokens("anything", TOK) == []
    assert not (tmp_path / "memory").exists()


async def test_remember_and_recall_within_the_budget(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, recall_k=3, recall_budget_tokens=120, remember=["observation", "speak"])
    async with MemoryService(cfg) as mem:
        mem.remember("observation", "The boiler in the basement makes a knocking noise at night.", source="chat")
        mem.remember("speak", "I will check the boiler pressure tomorrow morning.")
        mem.remember("exec", "print(42)")  # not in `remember`: not stored
        mem.remember("speak", "Bananas are rich in potassium.")
        await mem.aclose()  # waits for the background stores
    async with MemoryService(cfg) as mem:
        assert (await mem.handle("memory.stats", {}))["kinds"] == {"observation": 1, "speak": 2}
        toks = await mem.recall_tokens("Why is the boiler knocking?", TOK)
        assert toks[0] == ID["MEM"] and toks[-1] == ID["END_MEM"] and len(toks) <= 120
        text = TOK.decode(toks[1:-1])
        assert "boiler" in text and "Bananas" not in text  # below recall_min_score
        assert await mem.recall_tokens("The boiler in the basement makes a knocking noise at night.", TOK) != []
        own = TOK.decode((await mem.recall_tokens("The boiler in the basement makes a knocking noise at night.", TOK))[1:-1])
        assert "knocking noise at night" not in own  # the observation itself is not recalled to itself
    tiny = make_config(tmp_path, recall_budget_tokens=30)
    async with MemoryService(tiny) as mem:
        toks = await mem.recall_tokens("Why is the boiler knocking?", TOK)
        assert 0 < len(toks) <= 30 and TOK.decode(toks[1:-1]).endswith("…")


async def test_pause_snapshots_and_restore_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = models.build("hyena", **TINY)
    with torch.no_grad():
        _, state = backbone.forward(torch.tensor([[1, 2, 3, 4, 5]]), backbone.init_state())
    cfg = make_config(tmp_path, snapshots_keep=2)
    async with MemoryService(cfg) as mem:
        assert mem.restore(backbone) is None
        for breath in range(3):
            await mem.pause(state, [1, 2, 3, 4, 5], {"breath": breath, "turn": 7})
        assert (await mem.status())["snapshot"]["seq"] == 3
    async with MemoryService(cfg) as mem:
        snap = mem.restore(backbone)
        assert snap is not None and snap.clock == {"breath": 2, "turn": 7} and snap.context == [1, 2, 3, 4, 5]
        assert state_digest(snap.state) == state_digest(state)
        assert (await mem.status())["snapshot"]["restored"] is True
    assert len(list((tmp_path / "snapshots").glob("state-*.safetensors"))) == 2


def test_cli_export_import_work_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from agentd import cli_memory
    from memory_store import LongTermMemory

    cfg = config_mod.from_dict({"daemon": {"data_dir": str(tmp_path / "a"), "run_dir": str(tmp_path / "run")}})
    with LongTermMemory(cfg.data_dir / "memory", cfg.memory) as m:
        m.add("the tram to the airport leaves from platform 3", kind="note")
    parser = argparse.ArgumentParser()
    cli_memory.add_parser(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "backup.jsonl"
    assert cli_memory.run(parser.parse_args(["memory", "export", str(out)]), cfg) == 0  # no daemon: offline
    assert "exported 1 memories" in capsys.readouterr().out
    other = config_mod.from_dict({"daemon": {"data_dir": str(tmp_path / "b"), "run_dir": str(tmp_path / "run")}})
    assert cli_memory.run(parser.parse_args(["memory", "import", str(out)]), other) == 0
    assert "added 1" in capsys.readouterr().out
    assert cli_memory.run(parser.parse_args(["memory", "search", "tram"]), other) == 1  # needs the daemon
    assert "not running" in capsys.readouterr().err
