"""genai_config.json for a fused export, so that onnxruntime-genai's runtime (`og.Model(EXPORT_DIR)`) can load it.

genai binds inputs and outputs by the names in the config and sizes the KV cache from one `num_key_value_heads` and
`head_size` for all `num_hidden_layers`; the fused graph's interface names are genai's, and `logits_positions` gets a
default (every position) so genai need not feed it. `past_present_share_buffer` is true: genai then hands each
GroupQueryAttention one buffer of max_length positions as past and present, and the op writes the new positions in
place (as gisp-fx's own runner does, exporters/ort.py's SharedCache).
"""

from __future__ import annotations

import json
from pathlib import Path

GENAI_CONFIG = "genai_config.json"


def genai_config(config, layout, filename: str = "model.onnx") -> dict:
    """The genai_config.json content for an export of `config` whose graph cache is `layout` (graph K/V heads)."""
    cfg = config.get_text_config(decoder=True)
    eos = cfg.eos_token_id if getattr(cfg, "eos_token_id", None) is not None else 0
    return {
        "model": {
            "bos_token_id": getattr(cfg, "bos_token_id", None) or 0,
            "eos_token_id": eos,
            "pad_token_id": getattr(cfg, "pad_token_id", None) if getattr(cfg, "pad_token_id", None) is not None
            else (eos[0] if isinstance(eos, list) else eos),
            "context_length": cfg.max_position_embeddings,
            "type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": layout.head_dims[0] if layout.head_dims else 0,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": len(layout.layers),
                "num_key_value_heads": layout.kv_heads[0] if layout.kv_heads else 0,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": cfg.max_position_embeddings, "num_beams": 1,
                   "past_present_share_buffer": True, "top_k": 1, "top_p": 1.0, "temperature": 1.0,
                   "repetition_penalty": 1.0, "min_length": 0, "num_return_sequences": 1, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def genai_note(layout) -> str:
    """'ok', or why genai cannot run this export: it names cache tensors past_key_values.0 .. n-1 for n layers."""
    if tuple(layout.layers) != tuple(range(layout.num_layers)):
        gone = sorted(set(range(layout.num_layers)) - set(layout.layers))
        return (f"not written: layers {gone} have no attention left (no cache), and genai binds "
                f"past_key_values.0..{len(layout.layers) - 1} by position, one per layer")
    return "ok"


def write_genai_config(folder: Path, config, layout, filename: str = "model.onnx") -> Path:
    path = Path(folder) / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(config, layout, filename), indent=1))
    return path
