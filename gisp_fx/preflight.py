"""Checks of settings against the model before the expensive work: window length against the model's positions,
the tokenizer's ids against its vocabulary, and the types a public entry point was called with."""

from __future__ import annotations

import sys

from gisp_fx.errors import GispError

CALIBRATION_FREE = ("magnitude", "random")  # as gisp_fx.config.CALIBRATION_FREE: these read no windows


def position_limit(model) -> int | None:
    """The model's max_position_embeddings (GPT-2: n_positions), or None where it declares none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def fit_positions(model, seq_len: int, what: str = "perplexity windows") -> int:
    """`seq_len`, or the model's position limit with a printed note when the windows would be longer."""
    limit = position_limit(model)
    if limit is None or seq_len <= limit:
        return seq_len
    print(f"note: {what} of {seq_len} tokens exceed the model's max_position_embeddings {limit}; using {limit}-token "
          "windows", file=sys.stderr)
    return limit


def check_calibration_positions(model, method: str, seq_len: int) -> None:
    """Calibration windows longer than the model's positions are refused: clamping would calibrate on other
    windows than the run records."""
    limit = position_limit(model)
    if method not in CALIBRATION_FREE and limit is not None and seq_len > limit:
        raise GispError(f"--seq-len {seq_len}: the model has {limit} positions (max_position_embeddings); "
                        f"calibration windows cannot be longer: pass --seq-len {limit} or less")


def check_vocabulary(spec: str, model, tokenizer) -> None:
    """Refuse a tokenizer that can give ids the model's embedding has no row for (an IndexError deep in a forward
    pass otherwise): it belongs to another model."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    if rows is None or tokenizer is None:
        return
    size = len(tokenizer)
    if size > rows:
        raise GispError(f"model '{spec}': its tokenizer has {size:,} tokens (ids up to {size - 1:,}) but the model's "
                        f"embedding has {rows:,} rows; the tokenizer files belong to another model: copy the "
                        "model's own tokenizer files into the folder")


def check_ids(model, ids, source: str) -> None:
    """Refuse token ids beyond the model's embedding (see check_vocabulary), naming the largest."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    if rows is not None and ids.numel() and int(ids.max()) >= rows:
        raise GispError(f"{source}: token id {int(ids.max()):,} is beyond the model's vocabulary of {rows:,}; the "
                        "tokenizer belongs to another model: use the model's own tokenizer")


def require_types(function: str, **arguments: tuple[object, type | tuple[type, ...]]) -> None:
    """Refuse a public entry point's argument of the wrong type with a GispError naming it and the expected type
    (rather than an AttributeError from deep inside)."""
    for name, (value, expected) in arguments.items():
        if not isinstance(value, expected):
            types = expected if isinstance(expected, tuple) else (expected,)
            names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise GispError(f"{function}: argument '{name}' must be {names}, got {type(value).__name__} "
                            f"({value!r:.60})")
