"""A test double of a backbone that pins the agent loop's routing (tests only, never shipped).

It plays a fixed script each turn: ``execs`` times ``EXEC code END_EXEC``, then ``SPEAK reply WAIT``.
A cursor in its state advances when the token it is fed is the one it predicted, so observations
and RESULTs fed by the loop leave it where it was and its own sampled tokens move it on; after WAIT
it wraps to the start for the next turn. The logits put all the mass on the scripted token, so any
sampler picks it. Installed for a daemon subprocess by putting this directory on ``PYTHONPATH``: the
dist-info beside it declares the ``agentd.backbones`` entry point ``scripted``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.base import Backbone
from models.tokenizer import DEFAULT as TOK
from models.tokenizer import VOCAB_SIZE


@dataclass
class ScriptedConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 1
    n_layers: int = 1
    code: str = "print(6 * 7)"
    reply: str = "done"
    execs: int = 1


class Scripted(Backbone):
    name = "scripted"
    Config = ScriptedConfig

    def __init__(self, config: ScriptedConfig) -> None:
        super().__init__(config)
        script: list[int] = []
        for _ in range(config.execs):
            script += [*TOK.control("EXEC"), *TOK.encode(config.code), *TOK.control("END_EXEC")]
        script += [*TOK.control("SPEAK"), *TOK.encode(config.reply), *TOK.control("WAIT")]
        self.register_buffer("script", torch.tensor(script, dtype=torch.long), persistent=False)
        self.scale = nn.Parameter(torch.tensor(50.0))  # a real parameter: devices and counts need one

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        return {"cursor": torch.zeros(batch_size, dtype=torch.float32)}

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        n = self.script.numel()
        cursor = tensors["cursor"].long()
        out = torch.zeros(*tokens.shape, self.config.vocab_size)
        for t in range(tokens.shape[1]):
            cursor = torch.where(tokens[:, t] == self.script[cursor], (cursor + 1) % n, cursor)
            out[:, t, :] = nn.functional.one_hot(self.script[cursor], self.config.vocab_size).float() * self.scale
        return out, {"cursor": cursor.float()}
