"""A tokenizer -> GGUF tokenizer metadata: copied from the model's source GGUF, or written from a Hugging Face
byte-level BPE tokenizer; anything else is refused (llama.cpp would tokenise it differently)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gisp_fx.errors import GispError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # llama.cpp's token types
PREFIX = "tokenizer."


@dataclass(frozen=True)
class Vocab:
    """Tokenizer metadata as GGUF key/value triples (key, value, value type, array item type), and its origin."""

    fields: tuple
    size: int
    origin: str  # "gguf:<path>" or "hf:bpe"


SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def read_fields(path: Path, prefix: str = PREFIX) -> list[list]:
    """The GGUF key/value section of `path` (format v2/v3), the keys under `prefix` as [key, value, type, item type];
    strings as bytes (copied as they are), numeric arrays as lists. Reads only the header: the tokenizer of a
    135M-parameter file in a fraction of a second, where gguf.GGUFReader maps every tensor and item first."""
    import struct

    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise GispError(f"tokenizer: '{path}' is not a GGUF file (no GGUF magic); give the model's GGUF")
        version, _, count = struct.unpack("<IQQ", head[4:])
        if version not in (2, 3):
            raise GispError(f"tokenizer: '{path}' is GGUF version {version}; versions 2 and 3 are read")

        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            return f.read(read("<Q"))

        def value(kind):
            if kind == STRING:
                return string()
            if kind in SCALARS:
                return read(SCALARS[kind])
            raise GispError(f"tokenizer: '{path}' holds a value of unknown GGUF type {kind}; the file is damaged")

        out = []
        for _ in range(count):
            key = string().decode("utf-8")
            kind = read("<I")
            if kind == ARRAY:
                sub, n = read("<I"), read("<Q")
                if sub in SCALARS and sub != 7:
                    size = struct.calcsize(SCALARS[sub])
                    items = np.frombuffer(f.read(n * size), dtype=np.dtype(SCALARS[sub])).tolist()
                else:
                    items = [value(sub) for _ in range(n)]
                item = [key, items, kind, sub]
            else:
                item = [key, value(kind), kind, None]
            if key.startswith(prefix):
                out.append(item)
    return out


def from_gguf(path: Path, vocab_size: int) -> Vocab:
    """Every `tokenizer.*` field of the GGUF at `path`, byte for byte; the token list padded (unused tokens) to the
    model's embedding rows where the embedding is larger."""
    from gguf import GGUFValueType

    fields = [[k, v, GGUFValueType(t), GGUFValueType(s) if s is not None else None] for k, v, t, s in
              read_fields(path)]
    size = next((len(f[1]) for f in fields if f[0] == "tokenizer.ggml.tokens"), 0)
    if not size:
        raise GispError(f"tokenizer: the source GGUF '{path}' has no tokenizer.ggml.tokens; it carries no tokenizer "
                        "to copy, export from a Hugging Face folder with its tokenizer files instead")
    if size > vocab_size:
        raise GispError(f"tokenizer: the source GGUF '{path}' has {size} tokens but the model's embedding has "
                        f"{vocab_size} rows; the model and its source GGUF do not belong together")
    for f in fields:  # llama.cpp needs one token per embedding row
        extra = vocab_size - size
        if extra and f[0] == "tokenizer.ggml.tokens":
            f[1] = f[1] + [f"[PAD{size + i}]".encode() for i in range(extra)]
        elif extra and f[0] == "tokenizer.ggml.token_type":
            f[1] = f[1] + [UNUSED] * extra
        elif extra and f[0] == "tokenizer.ggml.scores":
            f[1] = f[1] + [0.0] * extra
    return Vocab(tuple(tuple(f) for f in fields), vocab_size, f"gguf:{path}")


def from_hf(tokenizer, vocab_size: int) -> Vocab:
    """A fast Hugging Face tokenizer whose model is byte-level BPE with GPT-2's pre-tokenizer -> llama.cpp's `gpt2`
    tokenizer (tokens, types, merges, special ids). Other tokenizers are refused, naming what they are."""
    from gguf import GGUFValueType as T

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GispError(f"tokenizer: {type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; the GGUF "
                        "writer reads tokenizer.json. Export from the model's source GGUF, or save the model with a "
                        "fast tokenizer")
    doc = json.loads(backend.to_str())
    model = doc.get("model") or {}
    pre = doc.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or not _gpt2_pre(pre) or doc.get("normalizer"):
        what = (f"model {model.get('type')}, pre-tokenizer {pre.get('type')}, "
                f"normalizer {(doc.get('normalizer') or {}).get('type')}")
        raise GispError(f"tokenizer: only byte-level BPE with GPT-2's pre-tokenizer and no normalizer is written from "
                        f"a Hugging Face tokenizer (llama.cpp's gpt2 model, gpt-2 pre-tokenizer); this one is {what}. "
                        "Export the model from its "
                        "source GGUF (a pruned run of a GGUF model finds it through trajectory/trajectory.json), "
                        "where the tokenizer is copied as llama.cpp made it")
    vocab = dict(model["vocab"])
    special = set()
    for added in doc.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    added_ids = {a["id"] for a in doc.get("added_tokens") or []}
    if max(vocab.values()) >= vocab_size:
        raise GispError(f"tokenizer: token id {max(vocab.values())} is beyond the model's {vocab_size} embedding "
                        "rows; the tokenizer belongs to another model")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = CONTROL if i in special else USER_DEFINED if i in added_ids else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    fields = [("tokenizer.ggml.model", "gpt2", T.STRING, None), ("tokenizer.ggml.pre", "gpt-2", T.STRING, None),
              ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
              ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
              ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING)]
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int) and 0 <= value < vocab_size:
            fields.append((f"tokenizer.ggml.{key}_token_id", value, T.UINT32, None))
    fields.append(("tokenizer.ggml.add_bos_token", _adds_bos(tokenizer), T.BOOL, None))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields.append(("tokenizer.chat_template", template, T.STRING, None))
    return Vocab(tuple(fields), vocab_size, "hf:bpe")


def _gpt2_pre(pre: dict) -> bool:
    """GPT-2's byte-level pre-tokenizer: ByteLevel with its regex (alone, or as the one step of a Sequence)."""
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    return tokenizer("a")["input_ids"][:1] == [bos]
