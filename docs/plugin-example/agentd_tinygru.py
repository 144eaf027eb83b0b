"""TinyGRU (``tinygru``): the smallest useful agentd backbone, the worked example of docs/backbones.md.

    tokens ─► embedding ─► GRU (n_layers) ─► RMS-normalised ─► head ─► logits [B, T, V]

Streaming state: ``h`` [B, n_layers, d_model] fp32, the GRU's hidden state after the last token. The
GRU is recurrent, so the state is fixed-size by construction and ``forward`` over a chunk equals
``step`` token by token (the base class's default ``_step`` is ``_forward`` on one token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.base import Backbone
from models.tokenizer import VOCAB_SIZE


@dataclass
class TinyGRUConfig:
    vocab_size: int = VOCAB_SIZE  # bytes plus agentd's control tokens
    d_model: int = 64
    n_layers: int = 1

    def __post_init__(self) -> None:
        # Raised errors become BackboneConfigError naming the backbone: a bad [backbone.options] stops start-up.
        if self.d_model < 1 or self.n_layers < 1 or self.vocab_size < 1:
            raise ValueError("vocab_size, d_model and n_layers must be >= 1")


class TinyGRU(Backbone):
    """Registered by the ``agentd.backbones`` entry point in pyproject.toml, not by ``@register``."""

    name = "tinygru"
    Config = TinyGRUConfig

    def __init__(self, config: TinyGRUConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.gru = nn.GRU(config.d_model, config.d_model, num_layers=config.n_layers, batch_first=True)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        c = self.config
        return {"h": torch.zeros(batch_size, c.n_layers, c.d_model, device=self.device)}

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        # nn.GRU wants the hidden state as [layers, B, D]; the state keeps the batch first like every tensor.
        y, h = self.gru(self.embed(tokens), tensors["h"].transpose(0, 1).contiguous())
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head(y), {"h": h.transpose(0, 1).contiguous()}
