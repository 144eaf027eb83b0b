"""Held-out evaluation through the daemon's own loop code (``agentd eval``).

Each held-out episode (models.data, split ``heldout``: phrasings, names, words and numbers never
trained on) runs in a fresh ``agentd.agent.Agent`` with a fresh state, the way a turn runs in the
daemon: HOLD's recall (``Agent._recall`` over a real ``MemoryService``: SQLite + FAISS + MiniLM),
then ``Agent.run_turn`` (generation with the configured sampling; EXEC through the real
``SandboxService``; RESULT fed back). Sensor episodes go through ``SenseService.feed`` / ``sense``
(Soma's ranges from the configuration), as MQTT or ``agentd condition`` readings do.

Scores, per skill (a turn is well formed when it ends with the model's own WAIT, with no error,
no guard and no token cap):
  arithmetic  an EXEC ran, its result holds the answer, and the SPEAK says it
  fact        told a fact (plus unrelated ones stored beside it), asked later: the SPEAK copies it
  calm        calm readings: no SPEAK at all (silence)
  alert       a reading out of range: a SPEAK naming it
  chat        a greeting or an unanswerable question: a short reply that is the honest one
"""

from __future__ import annotations

import asyncio
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentd import config as config_mod
from agentd.config import Config

SKILL_LABELS = {
    "arithmetic": "arithmetic via EXEC",
    "fact": "fact recall",
    "calm": "silence when calm",
    "alert": "alert when out of range",
    "chat": "chat: short honest reply",
}


class EvalError(Exception):
    """Evaluation cannot run (no checkpoint, a broken sandbox...)."""


@dataclass
class Outcome:
    skill: str
    ok: bool
    well_formed: bool
    speak: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


def says(text: str, answer: str) -> bool:
    """``answer`` appears in ``text`` as a whole token (``12`` is not found in ``-12`` or ``123``)."""
    return re.search(rf"(?<![\w-]){re.escape(answer)}(?!\w)", text) is not None


class _Harness:
    def __init__(self, config: Config, backbone: Any, workdir: Path, verbose: bool) -> None:
        self.config, self.backbone, self.workdir, self.verbose = config, backbone, workdir, verbose
        self.n = 0
        self.recalled = ""  # the MEM observation of the last turn, for --verbose

    def agent(self, config: Config | None = None) -> Any:
        from agentd.agent import Agent
        from agentd.breath import BreathClock
        from agentd.events import EventBus

        cfg = config or self.config
        return Agent(cfg, self.backbone, EventBus(cfg.socket.client_queue), BreathClock(cfg.breath))

    async def turn(self, agent: Any, observations: list[Any]) -> tuple[Any, list[dict[str, Any]]]:
        """One breath's HOLD + EXHALE for ``observations``, as ``Agent.run`` does them."""
        events: list[dict[str, Any]] = []
        for obs in observations:
            obs.listener = events.append
        recalled = await agent._recall(observations)
        self.recalled = agent.backbone.tokenizer.decode(recalled) if recalled else ""
        res = await agent.run_turn(observations, recalled)
        return res, events

    @staticmethod
    def well_formed(res: Any, events: list[dict[str, Any]]) -> bool:
        return res.reason == "wait" and not any(e.get("event") == "error" for e in events)

    async def arithmetic(self, ep: Any) -> Outcome:
        from agentd.agent import Observation
        from sandbox.service import SandboxService

        agent = self.agent()
        async with SandboxService(self.config.sandbox, agent.emit) as sandbox:
            agent.executor = sandbox
            res, events = await self.turn(agent, [Observation("chat", ep.expect["question"])])
        answer = ep.expect["answer"]
        execs = [e for e in events if e.get("event") == "exec"]
        results = [e for e in events if e.get("event") == "exec_result"]
        ran = any(r.get("exit_code") == 0 and says(r.get("stdout", ""), answer) for r in results)
        ok = bool(execs) and ran and says(res.speak, answer)
        return Outcome("arithmetic", ok, self.well_formed(res, events), res.speak,
                       {"question": ep.expect["question"], "answer": answer, "code": [e.get("code") for e in execs],
                        "kind": "string" if "'" in ep.expect["code"] else "number"})

    async def fact(self, ep: Any) -> Outcome:
        from agentd.agent import Observation
        from agentd.memory_service import MemoryService

        self.n += 1
        cfg = config_mod.replace(self.config, "daemon", data_dir=str(self.workdir / f"fact{self.n}"))
        cfg = config_mod.replace(cfg, "memory", enabled=True)
        agent = self.agent(cfg)
        async with MemoryService(cfg) as memory:
            agent.memory = memory
            for other in filter(None, ep.expect["distractors"].split("\n")):
                memory.remember("chat", other, source="client")  # told earlier, not what is asked
            told, ev1 = await self.turn(agent, [Observation("chat", ep.expect["tell"])])
            asked, ev2 = await self.turn(agent, [Observation("chat", ep.expect["ask"])])
        answer = ep.expect["answer"]
        return Outcome("fact", says(asked.speak, answer),
                       self.well_formed(told, ev1) and self.well_formed(asked, ev2), asked.speak,
                       {"tell": ep.expect["tell"], "ask": ep.expect["ask"], "answer": answer, "ack": told.speak,
                        "recalled": self.recalled})

    async def _sense(self, ep: Any) -> tuple[Any, list[dict[str, Any]]]:
        import json

        from agentd.senses import SenseService

        agent = self.agent()
        senses = SenseService(self.config, agent, agent.bus)
        senses.feed(json.loads(ep.expect["values"]), "eval")
        obs = senses.sense()
        if obs is None:
            raise EvalError("Soma produced no observation for the readings")
        return await self.turn(agent, [obs])

    async def calm(self, ep: Any) -> Outcome:
        res, events = await self._sense(ep)
        return Outcome("calm", not res.speak.strip(), self.well_formed(res, events), res.speak,
                       {"values": ep.expect["values"]})

    async def alert(self, ep: Any) -> Outcome:
        res, events = await self._sense(ep)
        reading = ep.expect["reading"]
        return Outcome("alert", reading in res.speak, self.well_formed(res, events), res.speak,
                       {"values": ep.expect["values"], "reading": reading})

    async def chat(self, ep: Any) -> Outcome:
        from agentd.agent import Observation

        res, events = await self.turn(self.agent(), [Observation("chat", ep.expect["question"])])
        ok = res.speak.strip() == ep.expect["answer"]
        return Outcome("chat", ok, self.well_formed(res, events), res.speak, {"question": ep.expect["question"]})


def load(config: Config, checkpoint: str | None) -> tuple[Any, str]:
    """The backbone to evaluate: ``checkpoint`` if given, else what the daemon would load."""
    import models
    from agentd.daemon import load_backbone

    if checkpoint:
        if not (Path(checkpoint) / "config.json").exists():
            raise EvalError(f"{checkpoint} is not a checkpoint directory (no config.json)")
        return models.load_checkpoint(checkpoint), str(checkpoint)
    return load_backbone(config)


def run(config: Config, checkpoint: str | None = None, skills: list[str] | None = None, episodes: int = 20, seed: int = 1,
        temperature: float | None = None, verbose: bool = False, exec_temperature: float | None = None) -> dict[str, Any]:
    """Evaluate; a report dict (``format_report`` prints it)."""
    return asyncio.run(arun(config, checkpoint, skills, episodes, seed, temperature, verbose, exec_temperature))


async def arun(config: Config, checkpoint: str | None = None, skills: list[str] | None = None, episodes: int = 20,
               seed: int = 1, temperature: float | None = None, verbose: bool = False,
               exec_temperature: float | None = None) -> dict[str, Any]:
    from models.data import SKILLS, EpisodeGenerator

    # Before the load: an out-of-range temperature is refused without waiting for the model.
    sampling = {k: v for k, v in (("temperature", temperature), ("exec_temperature", exec_temperature)) if v is not None}
    config = config_mod.replace(config, "backbone", **sampling)
    backbone, source = await asyncio.to_thread(load, config, checkpoint)
    backbone.eval()
    # Approval prompts and long rests have no one to answer them here.
    config = config_mod.replace(config, "sandbox", approve="auto", enabled=True)
    gen = EpisodeGenerator(seed, "heldout")
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="agentd-eval-") as tmp:
        h = _Harness(config, backbone, Path(tmp), verbose)
        for skill in skills or SKILLS:
            rng = random.Random(f"{seed}:{skill}")
            for i in range(episodes):
                out = await getattr(h, skill)(gen.episode(rng, skill))
                outcomes.append(out)
                if verbose:
                    mark = "ok " if out.ok else "BAD"
                    wf = "" if out.well_formed else " (malformed)"
                    print(f"[{skill} {i}] {mark}{wf} speak={out.speak!r} {out.detail}", flush=True)
    report: dict[str, Any] = {"checkpoint": source, "episodes": len(outcomes), "seed": seed,
                              "temperature": config.backbone.temperature,
                              "exec_temperature": config.backbone.exec_temperature, "skills": {}}
    report["well_formed"] = _rate([o.well_formed for o in outcomes])
    for skill in skills or SKILLS:
        mine = [o for o in outcomes if o.skill == skill]
        report["skills"][skill] = {"label": SKILL_LABELS[skill], **_rate([o.ok for o in mine]),
                                   "well_formed": _rate([o.well_formed for o in mine])["rate"]}
        if skill == "arithmetic":  # numbers and string work apart: they fail differently
            report["skills"][skill]["kinds"] = {k: _rate([o.ok for o in mine if o.detail["kind"] == k])
                                                for k in ("number", "string")}
    return report


def _rate(flags: list[bool]) -> dict[str, Any]:
    n = len(flags)
    return {"ok": sum(flags), "n": n, "rate": round(sum(flags) / n, 4) if n else 0.0}


def format_report(report: dict[str, Any]) -> str:
    wf = report["well_formed"]
    lines = [f"checkpoint: {report['checkpoint']}  (held-out episodes, seed {report['seed']}, "
             f"temperature {report['temperature']}, in EXEC code {report['exec_temperature']})",
             f"  {'protocol well-formed':<26} {wf['rate']:>7.1%}  ({wf['ok']}/{wf['n']})"]
    for s in report["skills"].values():
        lines.append(f"  {s['label']:<26} {s['rate']:>7.1%}  ({s['ok']}/{s['n']})")
        for kind, k in s.get("kinds", {}).items():
            lines.append(f"    {kind:<24} {k['rate']:>7.1%}  ({k['ok']}/{k['n']})")
    return "\n".join(lines)
