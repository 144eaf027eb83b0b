"""agentd's backbones: one streaming, stateful protocol and the architectures that implement it.

    import models
    bb = models.build("hyena", d_model=64, n_layers=2)
    state = bb.init_state(batch_size=1)
    logits, state = bb.forward(tokens, state)      # [B, T] -> [B, T, V]
    logits, state = bb.step(token, state)          # [B]    -> [B, V]
    models.save_state(state, path); state = models.load_state(path, bb)
"""

from models import tokenizer
from models.base import (
    Backbone,
    BackboneConfigError,
    CheckpointError,
    ModelError,
    State,
    StateError,
    StateMeta,
    atomic_write_bytes,
    available,
    build,
    count_parameters,
    get_class,
    load_checkpoint,
    load_state,
    read_checkpoint_meta,
    register,
    save_checkpoint,
    save_state,
    state_digest,
)

__all__ = [
    "Backbone",
    "BackboneConfigError",
    "CheckpointError",
    "ModelError",
    "State",
    "StateError",
    "StateMeta",
    "atomic_write_bytes",
    "available",
    "build",
    "count_parameters",
    "get_class",
    "load_checkpoint",
    "load_state",
    "read_checkpoint_meta",
    "register",
    "save_checkpoint",
    "save_state",
    "state_digest",
    "tokenizer",
]
