"""Training: a curriculum from single turns to whole episodes to long streams with state carried.

Stages (fractions of ``steps``):
  1. segments  - one turn (observations + the agent's answer), each row from a fresh state
  2. episodes  - whole multi-turn episodes, each row from a fresh state
  3. streams   - long multi-episode streams cut into chunks; the state is carried from chunk to
                 chunk (truncated BPTT), so recurrent memory is trained, not only the window

AdamW with linear warm-up and cosine decay, gradient clipping, a NaN guard (a non-finite loss or
gradient skips the step; too many in a row aborts), checkpoints with resume (weights, optimizer and
step; the data is a pure function of (seed, step), so a resumed run sees what the first would have).
Loss is cross-entropy on the tokens the agent produces (its segments and controls), never on what
it observes, which it cannot predict.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.base import ModelError, build, load_checkpoint, save_checkpoint
from models.tokenizer import ID

# Keys every architecture's Config has; presets use only these so they fit any backbone.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2},
    "small": {"d_model": 128, "n_layers": 4},
}

Sample = tuple[list[int], list[int]]  # tokens, loss mask (1 = the model is trained to produce it)


class Curriculum(Protocol):
    """Where training text comes from; every method is a pure function of ``rng``."""

    def segment(self, rng: random.Random) -> Sample: ...

    def episode(self, rng: random.Random) -> Sample: ...

    def stream(self, rng: random.Random, n_tokens: int) -> Sample: ...


@dataclass
class TrainConfig:
    backbone: str = "nexus"
    preset: str = "small"
    options: dict[str, Any] = field(default_factory=dict)  # architecture Config overrides on top of the preset
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    stream_chunks: int = 4  # chunks per stream window in stage 3
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.05
    clip: float = 1.0
    stages: tuple[float, float, float] = (0.15, 0.45, 0.40)
    seed: int = 0
    threads: int = 0
    checkpoint_every: int = 250
    log_every: int = 10
    max_bad_steps: int = 20

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError("steps and batch_size must be >= 1 and seq_len >= 8")
        if abs(sum(self.stages) - 1.0) > 1e-6 or min(self.stages) < 0:
            raise ValueError(f"stages must be three non-negative fractions summing to 1, got {self.stages}")

    def stage_of(self, step: int) -> int:
        """1, 2 or 3 for a 0-based step."""
        a = self.stages[0] * self.steps
        b = a + self.stages[1] * self.steps
        return 1 if step < a else 2 if step < b else 3


@dataclass
class TrainResult:
    steps: int
    first_loss: float
    last_loss: float
    skipped_steps: int
    tokens: int
    seconds: float
    out: str


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _pad_batch(samples: Sequence[Sample], max_len: int) -> tuple[Tensor, Tensor]:
    """Right-pad to a common length (<= max_len + 1); padding is masked out, and causal models
    never see it before real tokens."""
    n = min(max_len + 1, max(len(t) for t, _ in samples))
    tokens = torch.full((len(samples), n), ID["PAD"], dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.float32)
    for i, (t, m) in enumerate(samples):
        t, m = t[:n], m[:n]
        tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return tokens, mask


def masked_loss(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] (from logits of tokens[:, :-1]) where mask[:, 1:] is set."""
    target, weight = tokens[:, 1:], mask[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    return (ce * weight.reshape(-1)).sum() / weight.sum().clamp(min=1.0)


def _save_optimizer(opt: torch.optim.Optimizer, path: Path, extra: dict[str, Any]) -> None:
    """Optimizer state as safetensors + JSON (no pickle)."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"param_groups": json.dumps(sd["param_groups"]), "extra": json.dumps(extra)})
    os.replace(tmp, path)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    tensors = load_file(str(path))
    state: dict[int, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": json.loads(md["param_groups"])})
    return json.loads(md["extra"])


class Trainer:
    """Runs a TrainConfig against a Curriculum, writing checkpoints into ``out``."""

    def __init__(self, cfg: TrainConfig, curriculum: Curriculum, out: str | os.PathLike[str],
                 on_log: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.curriculum, self.out = cfg, curriculum, Path(out)
        self.on_log = on_log
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.start_step = 0
        if (self.out / "config.json").exists() and (self.out / "optimizer.safetensors").exists():
            self.model = load_checkpoint(self.out, expect=cfg.backbone)
            self.opt = self._make_optimizer()
            extra = _load_optimizer(self.opt, self.out / "optimizer.safetensors")
            self.start_step = int(extra.get("step", 0))
        else:
            torch.manual_seed(cfg.seed)
            self.model = build(cfg.backbone, **{**PRESETS[cfg.preset], **cfg.options})
            self.opt = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr, betas=(0.9, 0.95),
        )

    def _batches(self, step: int) -> Iterator[tuple[Tensor, Tensor, bool]]:
        """Yield (tokens, mask, carry_state) chunks for one optimizer step."""
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + step)
        stage = cfg.stage_of(step)
        if stage == 1:
            yield (*_pad_batch([self.curriculum.segment(rng) for _ in range(cfg.batch_size)], cfg.seq_len), False)
        elif stage == 2:
            yield (*_pad_batch([self.curriculum.episode(rng) for _ in range(cfg.batch_size)], cfg.seq_len), False)
        else:
            n = cfg.seq_len * cfg.stream_chunks + 1
            tokens, mask = _pad_batch([self.curriculum.stream(rng, n) for _ in range(cfg.batch_size)], n)
            for c in range(cfg.stream_chunks):
                s = c * cfg.seq_len
                yield tokens[:, s : s + cfg.seq_len + 1], mask[:, s : s + cfg.seq_len + 1], True

    def checkpoint(self, step: int) -> None:
        save_checkpoint(self.model, self.out, step=step, extra={"train": asdict(self.cfg)})
        _save_optimizer(self.opt, self.out / "optimizer.safetensors", {"step": step})

    def run(self, progress: bool = True) -> TrainResult:
        from tqdm import tqdm

        cfg, model = self.cfg, self.model
        model.train()
        first = last = float("nan")
        bad = skipped = 0
        n_tokens = 0
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        scalars = open(self.out / "scalars.jsonl", "a")
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps,
                   disable=not progress, unit="step", dynamic_ncols=True)
        try:
            for step in bar:
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                self.opt.zero_grad(set_to_none=True)
                losses: list[float] = []
                finite = True
                state = None
                chunks = list(self._batches(step))
                for tokens, mask, carry in chunks:
                    if state is None or not carry:
                        state = model.init_state(tokens.shape[0])
                    # The chunk's last token is only a target; the next chunk starts by reading it.
                    logits, state = model(tokens[:, :-1], state)
                    loss = masked_loss(logits, tokens, mask)
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    (loss / len(chunks)).backward()
                    state = state.detach()
                    losses.append(float(loss.detach()))
                    n_tokens += int(tokens.numel())
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip) if finite else torch.tensor(float("nan"))
                if not finite or not torch.isfinite(grad_norm):
                    bad += 1
                    skipped += 1
                    self.opt.zero_grad(set_to_none=True)
                    if bad >= cfg.max_bad_steps:
                        raise ModelError(f"training diverged: {bad} non-finite steps in a row at step {step}")
                    continue
                bad = 0
                self.opt.step()
                cur = sum(losses) / len(losses)
                if math.isnan(first):
                    first = cur
                last = cur
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    rate = n_tokens / max(1e-9, time.perf_counter() - t0)
                    row = {"step": step, "stage": cfg.stage_of(step), "loss": round(cur, 4), "lr": lr_at(step, cfg),
                           "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(rate, 1)}
                    scalars.write(json.dumps(row) + "\n")
                    scalars.flush()
                    bar.set_postfix(loss=f"{cur:.3f}", stage=row["stage"], tok_s=f"{rate:,.0f}")
                    if self.on_log:
                        self.on_log(row)
                if (step + 1) % cfg.checkpoint_every == 0:
                    self.checkpoint(step + 1)
        finally:
            scalars.close()
            bar.close()
        model.eval()
        self.checkpoint(cfg.steps)
        return TrainResult(cfg.steps - self.start_step, first, last, skipped, n_tokens, time.perf_counter() - t0, str(self.out))

