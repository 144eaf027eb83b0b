"""The backbone protocol: streaming, stateful models with a fixed-size, serializable state.

Every architecture subclasses ``Backbone`` with a ``@dataclass`` Config (at least ``vocab_size``,
``d_model``, ``n_layers``) and implements three hooks:

    _init_tensors(batch_size)             -> dict[str, Tensor]          fixed-size, fp32 where float
    _forward(tokens [B,T], tensors, pos)  -> (logits [B,T,V], tensors)  chunked prefill
    _step(token [B], tensors, pos)        -> (logits [B,V], tensors)    optional, defaults to _forward

``pos`` is the absolute position of the first token given (the count consumed before it).

The public ``init_state`` / ``forward`` / ``step`` wrap them, stamp the ``State`` with its metadata
(architecture, config hash, format version, absolute position) and refuse a state from another
architecture or config. Hooks must not mutate the tensors they are given in place: callers keep
old states (snapshots, tests comparing branches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from torch import Tensor, nn

from models.tokenizer import DEFAULT as BYTE_TOKENIZER
from models.tokenizer import ByteTokenizer

STATE_FORMAT_VERSION = 1
CHECKPOINT_FORMAT_VERSION = 1
ENTRY_POINT_GROUP = "agentd.backbones"


class ModelError(Exception):
    """Root of every error raised by ``models``."""


class BackboneConfigError(ModelError, ValueError):
    """An unknown architecture, an unknown config key, or an impossible value."""


class StateError(ModelError):
    """A state that does not belong to this backbone, or a corrupt state file."""


class CheckpointError(ModelError):
    """A missing, corrupt or mismatched checkpoint."""


@dataclass(frozen=True)
class StateMeta:
    architecture: str
    config_hash: str
    format_version: int = STATE_FORMAT_VERSION
    position: int = 0  # absolute count of tokens consumed since init_state

    def advanced(self, n: int) -> StateMeta:
        return dataclasses.replace(self, position=self.position + n)


class State(dict[str, Tensor]):
    """Named tensors plus ``meta``. Plain data: it round-trips through safetensors bit for bit."""

    meta: StateMeta

    def __init__(self, tensors: Mapping[str, Tensor], meta: StateMeta) -> None:
        super().__init__(tensors)
        self.meta = meta

    def detach(self) -> State:
        """A copy cut from the autograd graph (truncated BPTT between training chunks)."""
        return State({k: v.detach() for k, v in self.items()}, self.meta)

    def clone(self) -> State:
        return State({k: v.clone() for k, v in self.items()}, self.meta)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values())

    def to_bytes(self) -> bytes:
        """Serialization as safetensors with metadata (the metadata's key order may vary)."""
        return st_save({k: v.contiguous().cpu() for k, v in self.items()}, metadata=_meta_dict(self.meta))

    @classmethod
    def from_bytes(cls, data: bytes) -> State:
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise StateError(f"corrupt state: {exc}") from exc
        return cls(tensors, _meta_from_header(data))


def _meta_dict(meta: StateMeta) -> dict[str, str]:
    return {
        "architecture": meta.architecture,
        "config_hash": meta.config_hash,
        "format_version": str(meta.format_version),
        "position": str(meta.position),
    }


def _meta_from_header(data: bytes) -> StateMeta:
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        md = header["__metadata__"]
        return StateMeta(md["architecture"], md["config_hash"], int(md["format_version"]), int(md["position"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise StateError(f"state has no valid agentd metadata: {exc}") from exc


def config_hash(architecture: str, config: Any) -> str:
    blob = json.dumps({"architecture": architecture, "config": dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Backbone(nn.Module):
    """Base class of every architecture. See the module docstring for the hooks to implement."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    # -- what architectures implement -------------------------------------------------------
    def _init_tensors(self, batch_size: int) -> dict[str, Tensor]:
        raise NotImplementedError  # abstract hook; every registered architecture overrides it

    def _forward(self, tokens: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError  # abstract hook; every registered architecture overrides it

    def _step(self, token: Tensor, tensors: dict[str, Tensor], pos: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits, tensors = self._forward(token[:, None], tensors, pos)
        return logits[:, -1], tensors

    # -- the protocol -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> ByteTokenizer:
        """How text and controls become this backbone's token ids."""
        return BYTE_TOKENIZER

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def meta(self) -> StateMeta:
        return StateMeta(self.name, config_hash(self.name, self.config))

    def init_state(self, batch_size: int = 1) -> State:
        return State(self._init_tensors(batch_size), self.meta)

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:  # type: ignore[override]
        """tokens LongTensor [B, T] -> logits [B, T, V] and the state after the last token."""
        self.check_state(state)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        logits, tensors = self._forward(tokens, dict(state), state.meta.position)
        return logits, State(_compact(tensors), state.meta.advanced(tokens.shape[1]))

    def step(self, token: Tensor, state: State) -> tuple[Tensor, State]:
        """token LongTensor [B] -> logits [B, V]; equal to ``forward`` on a length-1 chunk."""
        self.check_state(state)
        if token.dim() != 1:
            raise ValueError(f"token must be [B], got shape {tuple(token.shape)}")
        logits, tensors = self._step(token, dict(state), state.meta.position)
        return logits, State(_compact(tensors), state.meta.advanced(1))

    def check_state(self, state: Mapping[str, Tensor]) -> None:
        """Raise StateError unless ``state`` was made by this architecture with this config."""
        meta = getattr(state, "meta", None)
        if meta is None:
            raise StateError("not a models.State (no metadata); build it with init_state or load_state")
        mine = self.meta
        if meta.architecture != mine.architecture:
            raise StateError(f"state is for architecture {meta.architecture!r}, this backbone is {mine.architecture!r}")
        if meta.config_hash != mine.config_hash:
            raise StateError(
                f"state was made by a {meta.architecture} with another config "
                f"(config hash {meta.config_hash}, this one {mine.config_hash})"
            )
        if meta.format_version != STATE_FORMAT_VERSION:
            raise StateError(f"state format version {meta.format_version}, this agentd reads {STATE_FORMAT_VERSION}")


# -- state files ----------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_state(state: State, path: str | os.PathLike[str]) -> None:
    """Atomically write ``state`` (tensors + metadata) as safetensors."""
    atomic_write_bytes(path, state.to_bytes())


def load_state(path: str | os.PathLike[str], backbone: Backbone, batch_size: int | None = None) -> State:
    """Read a state file and check it fits ``backbone``: architecture, config, keys and shapes."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read state {path}: {exc}") from exc
    state = State.from_bytes(data)
    backbone.check_state(state)
    b = batch_size or _batch_of(state)
    template = backbone.init_state(b)
    if set(template) != set(state):
        raise StateError(f"state {path} has keys {sorted(state)}, expected {sorted(template)}")
    for k, t in template.items():
        if t.shape != state[k].shape or t.dtype != state[k].dtype:
            raise StateError(f"state {path}: {k} is {tuple(state[k].shape)} {state[k].dtype}, expected {tuple(t.shape)} {t.dtype}")
    return State({k: v.to(backbone.device) for k, v in state.items()}, state.meta)


def _batch_of(state: State) -> int:
    for t in state.values():
        if t.dim() > 0:
            return int(t.shape[0])
    return 1


def _compact(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with every view into a buffer over twice its size replaced by a compact copy.
    A state lives as long as the daemon: a last-position slice of a chunk's temporaries must not
    keep the whole chunk alive (astarte's 2.5 KiB ``abpe.R`` held a 1.1 MiB buffer). A ring buffer's
    slice of its own storage stays a view: copying it every step would cost more than it frees."""
    out = {}
    for name, t in tensors.items():
        if t.untyped_storage().nbytes() > 2 * t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)
        out[name] = t
    return out


def state_digest(state: State) -> str:
    """sha256 over the metadata and every tensor's name, dtype, shape and bytes, in sorted order:
    equal digests mean bit-identical states. (Not a hash of ``to_bytes``: safetensors writes its
    metadata map in an arbitrary order, so equal states can serialize to different bytes.)"""
    h = hashlib.sha256(json.dumps(_meta_dict(state.meta), sort_keys=True).encode())
    for name in sorted(state):
        # A fresh dense copy: ``contiguous`` keeps a size-1 view's stride, which ``view`` refuses.
        t = state[name].detach().cpu().clone(memory_format=torch.contiguous_format)
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- registry -------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Backbone]] = {}
# Built-ins are imported on first use so that `agentd status` never pays for transformers.
_BUILTIN_MODULES: dict[str, str] = {
    "hyena": "models.hyena",
    "nexus": "models.nexus",
    "hf": "models.hf",
    "agiformer": "models.agiformer",
    "spiral": "models.spiral",
    "astarte": "models.astarte",
    "remote": "models.remote",
}


def register(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make ``cls`` buildable by ``cls.name``."""
    if not cls.name:
        raise BackboneConfigError(f"{cls.__qualname__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Names of every architecture that can be built: built-ins and installed plugins."""
    names = {n for n, mod in _BUILTIN_MODULES.items() if importlib.util.find_spec(mod) is not None}
    return sorted(names | set(_REGISTRY) | set(_entry_points()))


def get_class(name: str) -> type[Backbone]:
    if name not in _REGISTRY:
        if name in _BUILTIN_MODULES and importlib.util.find_spec(_BUILTIN_MODULES[name]) is not None:
            importlib.import_module(_BUILTIN_MODULES[name])
        elif (ep := _entry_points().get(name)) is not None:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Backbone):
                _REGISTRY.setdefault(name, obj)
    if name not in _REGISTRY:
        raise BackboneConfigError(f"unknown backbone {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def make_config(cls: type[Backbone], overrides: Mapping[str, Any]) -> Any:
    """Build ``cls.Config`` from overrides, naming any unknown key or bad value."""
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise BackboneConfigError(f"{cls.name}: unknown config key(s) {unknown}; known: {sorted(fields)}")
    try:
        return cls.Config(**overrides)
    except (TypeError, ValueError) as exc:
        raise BackboneConfigError(f"{cls.name}: {exc}") from exc


def build(name: str, **overrides: Any) -> Backbone:
    """A fresh, randomly initialised backbone ``name`` with Config fields overridden."""
    cls = get_class(name)
    model = cls(make_config(cls, overrides))
    model.eval()
    return model


# -- checkpoints ----------------------------------------------------------------------------------
def save_checkpoint(backbone: Backbone, directory: str | os.PathLike[str], step: int = 0, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` (architecture, config, step) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in backbone.state_dict().items():
        t = v.detach().contiguous().cpu()
        # safetensors refuses tensors that share memory (tied embeddings, as in transformers
        # models): the second name gets its own copy, and load_state_dict ties them again.
        ptr = t.untyped_storage().data_ptr()
        tensors[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"architecture": backbone.name})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, d / "model.safetensors")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "architecture": backbone.name,
        "config": dataclasses.asdict(backbone.config),
        "step": step,
        **(dict(extra) if extra else {}),
    }
    atomic_write_bytes(d / "config.json", json.dumps(meta, indent=2, sort_keys=True).encode())


def read_checkpoint_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory} is not a checkpoint: no config.json") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(meta, dict) or "architecture" not in meta or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path} lacks 'architecture' or 'config'")
    if meta.get("format_version", CHECKPOINT_FORMAT_VERSION) > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta['format_version']} is newer than this agentd reads")
    return meta


def load_checkpoint(directory: str | os.PathLike[str], expect: str | None = None, **overrides: Any) -> Backbone:
    """Rebuild the backbone saved in ``directory``; ``expect`` checks its architecture name."""
    meta = read_checkpoint_meta(directory)
    if expect is not None and meta["architecture"] != expect:
        raise CheckpointError(f"{directory} holds a {meta['architecture']!r} checkpoint, expected {expect!r}")
    try:
        model = build(meta["architecture"], **{**meta["config"], **overrides})
    except BackboneConfigError as exc:
        raise CheckpointError(f"{directory}: {exc}") from exc
    path = Path(directory) / "model.safetensors"
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read weights {path}: {exc}") from exc
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit a {meta['architecture']} with its config: {exc}") from exc
    model.eval()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

