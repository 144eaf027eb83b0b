"""``hf``: any transformers causal LM from a local directory, as a streaming, stateful backbone.

    [backbone]
    name = "hf"
    [backbone.options]
    path = "/srv/models/qwen2.5-0.5b-instruct"   # config.json + weights + tokenizer, no hub access
    window = 1024                                # tokens the model sees at most
    keep = 512                                   # tokens kept when the window is full

The model is a black box that maps a token sequence to logits, so the streaming semantics are
defined around it, the same for a whole prompt, any chunking, and token-by-token stepping:

    window  the last tokens of the stream, at most ``window``, fed at positions 0..n-1
    full    when the window is full, the oldest ``window - keep`` tokens are dropped and the
            ``keep`` that remain are re-encoded from position 0 (learned and rotary positions
            both stay within what the model was trained on, for a stream of any length)

State (fixed size, batch first, every float fp32):
    tokens  [B, W] int64           the window's token ids (the first ``length`` are valid)
    length  [B] int64              how many are valid (equal across the batch)
    keys    [B, L, H, W, D] fp32   the model's KV cache for the window, when the model's cache is
    values  [B, L, H, W, D] fp32   plain per-layer keys/values (``kv_cache = "auto"``); else the
                                   window is re-run for every step (``kv_cache = "off"``)

The cache is data in the state, not a side table, so a saved state continues bit for bit and the
state's size never depends on the stream's length. Control tokens are text tags
(``models.texttags``): the transformers tokenizer sees ``<speak>`` as ordinary text, and text
observed from outside is escaped so it can never spell a control.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import Tensor

from models.base import Backbone, BackboneConfigError, StateMeta, register
from models.texttags import TAGS, Piece, TagStreamParser, escape, parse
from models.tokenizer import CLOSERS

log = structlog.get_logger("models.hf")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_KV_MODES = ("auto", "on", "off")


@dataclass
class HfConfig:
    path: str = ""  # a local directory holding a transformers causal LM and its tokenizer
    window: int = 1024  # tokens of context the model sees at most (<= its position limit)
    keep: int = 512  # tokens kept (re-encoded from position 0) when the window is full
    kv_cache: str = "auto"  # auto | on | off: carry the KV cache in the state, or re-run the window
    dtype: str = "float32"  # weights: float32 | bfloat16 | float16 (the state stays fp32)
    # The protocol's fields, read from the model; a non-zero value given here must match it.
    vocab_size: int = 0
    d_model: int = 0
    n_layers: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must name a local directory with a transformers model")
        if self.window < 2:
            raise ValueError(f"window must be >= 2, got {self.window}")
        if not 0 <= self.keep < self.window:
            raise ValueError(f"keep must be in [0, window), got keep={self.keep} window={self.window}")
        if self.kv_cache not in _KV_MODES:
            raise ValueError(f"kv_cache must be one of {_KV_MODES}, got {self.kv_cache!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


_SAMPLE = 1 << 20


def _fingerprint(path: Path) -> str:
    """What pins a state to these weights: the config and tokenizer files, and each weight file's
    name, size, first and last MiB (hashing gigabytes of weights at every start would be too slow;
    a retrained model of the same shape still differs in its first tensors' bytes)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        if f.name.endswith((".json", ".model", ".txt", ".jinja")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(_SAMPLE))
                fh.seek(max(0, size - _SAMPLE))
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()[:16]


class TextTokenizer:
    """agentd's tokenizer protocol (``models.tokenizer.ByteTokenizer``'s methods) over a
    transformers tokenizer: controls are text tags, observed text is escaped."""

    def __init__(self, tok: Any, vocab_size: int, stop_ids: set[int]) -> None:
        self.hf = tok
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids  # ids that end generation (EOS, a chat model's end-of-turn)
        eos = tok.eos_token_id
        self.eos_id: int = eos if eos is not None else min(stop_ids, default=0)
        self.pad_id: int = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self.bos_id: int = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id
        self._tag_ids = {name: self._raw(tag) for name, tag in TAGS.items()}

    def _raw(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` taken literally: a tag inside it is escaped, and a special token's
        spelling (``<|im_end|>``) stays text, so observed text can forge neither."""
        return list(self.hf.encode(escape(text), add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: list[int] | tuple[int, ...], controls: bool = True) -> str:
        text = self.hf.decode(list(ids), skip_special_tokens=True)
        if controls:
            return text
        return "".join(p.text for p in parse(text))

    def control(self, name: str) -> list[int]:
        """The ids of control ``name``'s tag (EOS: the model's own end-of-sequence id)."""
        if name == "EOS":
            return [self.eos_id]
        return list(self._tag_ids[name])

    def wrap(self, open_name: str, text: str) -> list[int]:
        return [*self.control(open_name), *self.encode(text), *self.control(CLOSERS[open_name])]

    def is_control(self, token_id: int) -> bool:
        return token_id in self.stop_ids

    def stream_decoder(self) -> TextStreamDecoder:
        return TextStreamDecoder(self)


class TextStreamDecoder:
    """Sampled ids -> Pieces, one id at a time: incremental detokenisation (text is emitted once
    it is complete UTF-8 and stable under the next token, as TGI and vLLM do it), then tags."""

    def __init__(self, tok: TextTokenizer) -> None:
        self._tok = tok
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to text already emitted; they give context
        self._read = 0
        self._tags = TagStreamParser()

    def push(self, token_id: int) -> list[Piece]:
        if token_id in self._tok.stop_ids:
            return [*self.flush(), Piece(control="EOS")]
        self._ids.append(token_id)
        decode = self._tok.hf.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return []  # an incomplete character or a token that only changes earlier text
        self._prefix, self._read = self._read, len(self._ids)
        if len(self._ids) > 256:  # keep the context short; the offsets move with it
            cut = self._prefix
            self._ids, self._prefix, self._read = self._ids[cut:], 0, self._read - cut
        return self._tags.push(after[len(before) :])

    def flush(self) -> list[Piece]:
        rest = ""
        if self._read < len(self._ids):
            decode = self._tok.hf.decode
            before = decode(self._ids[self._prefix : self._read], skip_special_tokens=True)
            rest = decode(self._ids[self._prefix :], skip_special_tokens=True)[len(before) :]
        self._ids, self._prefix, self._read = [], 0, 0
        return [*self._tags.push(rest), *self._tags.flush()]


@register
class Hf(Backbone):
    name = "hf"
    Config = HfConfig

    def __init__(self, config: HfConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(config.path).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise BackboneConfigError(f"hf: {path} is not a transformers model directory (no config.json)")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[config.dtype], local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise BackboneConfigError(f"hf: cannot load a causal LM and tokenizer from {path}: {exc}") from exc
        mcfg = model.config.get_text_config(decoder=True)
        found = {"vocab_size": int(model.get_output_embeddings().weight.shape[0]),
                 "d_model": int(mcfg.hidden_size), "n_layers": int(mcfg.num_hidden_layers)}
        for key, value in found.items():
            given = getattr(config, key)
            if given and given != value:
                raise BackboneConfigError(f"hf: {key}={given} was given but the model in {path} has {key}={value}")
        limit = getattr(mcfg, "max_position_embeddings", None) or getattr(mcfg, "n_positions", None)
        if limit is not None and config.window > limit:
            raise BackboneConfigError(f"hf: window={config.window} exceeds the model's {limit} positions")
        super().__init__(dataclasses.replace(config, path=str(path), **found))
        self.model = model
        self.fingerprint = _fingerprint(path)
        self.source = str(path)
        stop = model.generation_config.eos_token_id if model.generation_config is not None else None
        stop_ids = {*(stop if isinstance(stop, list) else [stop] if stop is not None else [])}
        if tok.eos_token_id is not None:
            stop_ids.add(int(tok.eos_token_id))
        self._tokenizer = TextTokenizer(tok, found["vocab_size"], stop_ids)
        self._kv = self._kv_layout() if config.kv_cache != "off" else None
        if self._kv is None and config.kv_cache == "on":
            raise BackboneConfigError(f"hf: the cache of {type(model).__name__} is not plain per-layer keys/values; "
                                      "set kv_cache = \"off\" (or \"auto\")")
        log.info("hf_loaded", path=str(path), model=type(model).__name__, parameters=sum(p.numel() for p in model.parameters()),
                 window=config.window, keep=config.keep, kv_cache=self._kv is not None)

    @property
    def tokenizer(self) -> TextTokenizer:  # type: ignore[override]
        return self._tokenizer

    @property
    def meta(self) -> StateMeta:
        # The weights' fingerprint stands for the path: a state is refused by other weights at the
        # same path, and follows the same weights to another path.
        fields = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "path"}
        blob = json.dumps({"architecture": self.name, "config": fields, "weights": self.fingerprint}, sort_keys=True)
        return StateMeta(self.name, hashlib.sha256(blob.encode()).hexdigest()[:16])

    def _kv_layout(self) -> tuple[int, int, int] | None:
        """(layers, kv heads, head dim) when the model's cache is plain per-layer keys/values of
        one shape, which the state can carry; None for sliding, hybrid or recurrent caches."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        with torch.no_grad():
            out = self.model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True)
        cache = getattr(out, "cache", None)
        if type(cache) is not DynamicCache or not cache.layers:
            return None
        shapes = set()
        for layer in cache.layers:
            if type(layer) is not DynamicLayer or layer.keys is None or layer.keys.dim() != 4:
                return None
            if layer.keys.shape != layer.values.shape or layer.keys.shape[2] != 2:
                return None
            shapes.add(tuple(layer.keys.shape[1::2]))
        if len(shapes) != 1:
            return None
        heads, dim = shapes.pop()
        return len(cache.layers), int(heads), int(dim)

    # -- the hooks ------------------------------------------------------------------------------
    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        W, dev = self.config.window, self.device
        out = {"tokens": torch.full((batch_size, W), self._tokenizer.pad_id, dtype=torch.long, device=dev),
               "length": torch.zeros(batch_size, dtype=torch.long, device=dev)}
        if self._kv is not None:
            L, H, D = self._kv
            out["keys"] = torch.zeros(batch_size, L, H, W, D, device=dev)
            out["values"] = torch.zeros(batch_size, L, H, W, D, device=dev)
        return out

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        W, K = self.config.window, self.config.keep
        win, n = tensors["tokens"], int(tensors["length"][0])
        keys, values = tensors.get("keys"), tensors.get("values")
        B, T = tokens.shape
        outs: list[Tensor] = []
        t = 0
        while t < T:
            if n == W:  # full: keep the newest K tokens and re-encode them from position 0
                win = torch.cat([win[:, W - K :], torch.full_like(win[:, : W - K], self._tokenizer.pad_id)], dim=1)
                n = K
                if keys is not None and values is not None:
                    keys, values = self._reencode(win, n, keys, values)
            take = min(T - t, W - n)
            chunk = tokens[:, t : t + take]
            if keys is not None and values is not None:
                logits, keys, values = self._run_cached(chunk, n, keys, values)
            else:
                logits = self.model(input_ids=torch.cat([win[:, :n], chunk], dim=1), use_cache=False).logits[:, n:]
            outs.append(logits.float())
            win = torch.cat([win[:, :n], chunk, win[:, n + take :]], dim=1)
            n += take
            t += take
        new = {"tokens": win, "length": torch.full((B,), n, dtype=torch.long, device=win.device)}
        if keys is not None and values is not None:
            new.update(keys=keys, values=values)
        return torch.cat(outs, dim=1), new

    def _cache(self, n: int, keys: Tensor, values: Tensor) -> Any:
        from transformers.cache_utils import DynamicCache

        dtype = next(self.model.parameters()).dtype
        if n == 0:
            return DynamicCache(config=self.model.config)
        # Slices of the state's tensors: DynamicLayer.update concatenates into new tensors, so the
        # state given to forward is never written (callers keep old states).
        data = [(keys[:, i, :, :n].to(dtype), values[:, i, :, :n].to(dtype)) for i in range(keys.shape[1])]
        return DynamicCache(data, config=self.model.config)

    def _run_cached(self, chunk: Tensor, n: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits for ``chunk`` after the window's first ``n`` tokens, and the KV cache with it."""
        B, take = chunk.shape
        cache = self._cache(n, keys, values)
        positions = torch.arange(n, n + take, device=chunk.device).expand(B, take)
        out = self.model(input_ids=chunk, cache=cache, use_cache=True, position_ids=positions)
        new_k = torch.stack([layer.keys[:, :, n : n + take] for layer in out.cache.layers], dim=1).float()
        new_v = torch.stack([layer.values[:, :, n : n + take] for layer in out.cache.layers], dim=1).float()
        keys = torch.cat([keys[:, :, :, :n], new_k, keys[:, :, :, n + take :]], dim=3)
        values = torch.cat([values[:, :, :, :n], new_v, values[:, :, :, n + take :]], dim=3)
        return out.logits, keys, values

    def _reencode(self, win: Tensor, n: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """The KV cache of the window's first ``n`` tokens from scratch (after a shift)."""
        zeros_k, zeros_v = torch.zeros_like(keys), torch.zeros_like(values)
        if n == 0:
            return zeros_k, zeros_v
        _, k, v = self._run_cached(win[:, :n], 0, zeros_k, zeros_v)
        return k, v

