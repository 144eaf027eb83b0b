"""Tiny transformers language models built locally for tests (nothing comes from a hub).

``byte_tokenizer``  a byte-level BPE tokenizer with no merges (every UTF-8 string encodes), chat
                    special tokens, a chat template, and optional extra words as single tokens
``tiny_gpt2`` / ``tiny_llama``  random models: learned positions and tied embeddings (GPT-2),
                    rotary positions and grouped KV heads (Llama)
``chain_llama``     a Llama whose reply is fixed by construction: its blocks add nothing, so the
                    logits depend only on the last token, and the LM head maps each word of
                    ``reply`` to the next one. After the chat template's ``<|assistant|>`` it says
                    ``reply`` word for word under greedy decoding, then EOS (or loops forever).
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ("<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The fixed reply of the chain model: THINK, then SPEAK with its tag split over two tokens (so a
# streaming server sends it in two chunks), then WAIT.
REPLY = ("<think>", "greet", " the", " user", "<sp", "eak>", "Hello", " from", " a", " tiny", " model", ".", "<wait/>")
LOOP = ("<speak>", " tick", " tock")  # " tock" -> " tick": speaks until max_tokens


def byte_tokenizer(words: tuple[str, ...] = ()) -> object:
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(tm.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if words:
        tk.add_tokens([AddedToken(w, special=False, normalized=False) for w in words])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>", pad_token="<|eos|>", chat_template=CHAT_TEMPLATE)


def _save(model: torch.nn.Module, tok: object, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # type: ignore[attr-defined]
    tok.save_pretrained(directory)  # type: ignore[attr-defined]
    return directory


def tiny_gpt2(directory: Path, seed: int = 0, n_positions: int = 64) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=n_positions,  # type: ignore[arg-type]
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    return _save(GPT2LMHeadModel(cfg), tok, directory)


def _llama_config(vocab: int, eos: int, hidden: int = 32) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       eos_token_id=eos, pad_token_id=eos, bos_token_id=None, tie_word_embeddings=False)


def tiny_llama(directory: Path, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(len(tok), tok.eos_token_id))  # type: ignore[arg-type, attr-defined]
    return _save(model, tok, directory)


def chain_llama(directory: Path, reply: tuple[str, ...] = REPLY, loop: bool = False, seed: int = 0) -> Path:
    """A Llama that answers ``reply`` (then EOS; or, with ``loop``, its last two words forever)."""
    from transformers import LlamaForCausalLM

    tok = byte_tokenizer(words=tuple(dict.fromkeys(reply)))
    ids = [tok.convert_tokens_to_ids("<|assistant|>")] + [tok.convert_tokens_to_ids(w) for w in reply]  # type: ignore[attr-defined]
    succ = dict(zip(ids[:-1], ids[1:], strict=True))
    succ[ids[-1]] = ids[-2] if loop else tok.eos_token_id  # type: ignore[attr-defined]
    torch.manual_seed(seed)
    hidden = 64
    model = LlamaForCausalLM(_llama_config(len(tok), tok.eos_token_id, hidden))  # type: ignore[arg-type, attr-defined]
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream passes through untouched
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        h = emb / emb.pow(2).mean(-1, keepdim=True).add(model.config.rms_norm_eps).sqrt()  # what the final RMSNorm gives
        head = model.lm_head.weight
        head.normal_(0.0, 0.02)
        for b in set(succ.values()):
            head[b] = 0.0
        for a, b in succ.items():  # logit ~20 for the successor (the rows of h are near orthogonal)
            head[b] += 20.0 * h[a] / hidden
    return _save(model, tok, directory)
