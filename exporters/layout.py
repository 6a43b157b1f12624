"""A decoder's KV-cache layout: which layers keep a cache, with their K/V head counts and head dims."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from gisp_fx.modeling_gisp import empty_attention_layers


@dataclass(frozen=True)
class CacheLayout:
    """Which decoder layers keep a KV cache, with their K/V head counts and head dims."""

    num_layers: int
    layers: tuple[int, ...]
    kv_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtype: str = "float32"

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in self.layers for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in self.layers for kind in ("key", "value")]

    def empty_past(self, batch: int, past: int = 0) -> dict[str, torch.Tensor]:
        dtype = getattr(torch, self.dtype)
        return {f"past_key_values.{i}.{kind}": torch.zeros(batch, h, past, d, dtype=dtype)
                for i, h, d in zip(self.layers, self.kv_heads, self.head_dims) for kind in ("key", "value")}



def cache_layout(model: nn.Module) -> CacheLayout:
    """Run the model once with a cache and read, per layer, the K/V shapes it stores (empty layers store none)."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = DynamicCache()
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    emptied = empty_attention_layers(model)  # their cache layer holds only a length-keeping stub
    layers, heads, dims, dtype = [], [], [], "float32"
    for i, layer in enumerate(cache.layers[:n]):
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0 or i in emptied:
            continue
        layers.append(i)
        heads.append(keys.shape[1])
        dims.append(keys.shape[3])
        dtype = str(keys.dtype).removeprefix("torch.")
    return CacheLayout(n, tuple(layers), tuple(heads), tuple(dims), dtype)
