"""Runtime support for models pruned by gisp-fx; copied next to every saved model and named in its auto_map.

Self-contained on purpose (torch + transformers only), so `from_pretrained(DIR, trust_remote_code=True)` needs no
gisp-fx. `config.gisp` records the pruned structure; `apply_structure_` rebuilds it on a freshly built model.
Query heads may share K/V heads unevenly after pruning, so K/V heads are gathered per query head through an
explicit index map instead of `repeat_kv`.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Attributes attention modules of different architectures use for head counts; set on every pruned module.
QUERY_HEAD_ATTRS = ("num_heads", "num_attention_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads")
INTERMEDIATE_ATTRS = ("intermediate_size",)
PREFIX = "gisp_"
# The version of this file's runtime. Saved folders carry a copy of it (and the number in config.gisp), so a later
# gisp-fx can tell an older copy and load the folder with its own, newer runtime instead. 1: unstamped copies.
# 3: a pruned linear may carry a bias its dense model lacked (--repair bias): rebuilt when shape or bias differ.
RUNTIME_VERSION = 3


def gisp_implementation(base: str) -> str:
    """Register (once) and return the attention implementation 'gisp_<base>': K/V gathered, then `base`.

    The mask function is the base's own, so padded batches are masked exactly as the base model masks them.
    """
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:

        def attention(module, query, key, value, attention_mask, **kwargs):
            if getattr(module, "gisp_kv_map", None) is not None:  # each query head reads its K/V head
                index = _kv_index(module, key.device)
                key = key.index_select(1, index)
                value = value.index_select(1, index)
            if base == "eager":
                fn = sys.modules[type(module).__module__].eager_attention_forward
            else:
                fn = ALL_ATTENTION_FUNCTIONS[base]
            return fn(module, query, key, value, attention_mask, **kwargs)

        def mask(*args, **kwargs):  # looked up per call, so a patched base mask (e.g. by an exporter) applies
            return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask)
    return name


def _kv_index(module: nn.Module, device: torch.device) -> torch.Tensor:
    # Built per call from a plain tuple: a buffer would be left uninitialised by from_pretrained (it builds modules
    # on the meta device), and a cached tensor would keep a fake tensor after torch.export traced the model.
    return torch.tensor(module.gisp_kv_map, dtype=torch.long, device=device)


def base_implementation(name: str | None) -> str:
    """The implementation a (possibly gisp_-wrapped) name runs underneath."""
    name = name or "sdpa"
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


gisp_implementation("sdpa")
gisp_implementation("eager")


class EmptyBlock(nn.Module):
    """An attention or MLP block whose every group was pruned: it adds only its output bias (if it had one)."""

    def __init__(self, hidden_size: int, bias: bool, returns_tuple: bool, replaces: nn.Module | None = None):
        super().__init__()
        self.out_bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.returns_tuple = returns_tuple
        if replaces is not None:  # plain attributes the decoder layer may read (is_sliding, layer_idx, ...)
            for key, value in vars(replaces).items():
                if not key.startswith("_") and isinstance(value, (bool, int, float, str, type(None))):
                    setattr(self, key, value)

    def forward(self, hidden_states, *args, **kwargs):
        if self.returns_tuple:
            _write_cache_stub(self, hidden_states, kwargs)
        out = torch.zeros_like(hidden_states)
        if self.out_bias is not None:
            out = out + self.out_bias.to(out.dtype)
        return (out, None) if self.returns_tuple else out


# The names decoder layers pass the KV cache under: transformers 5.x ("cache"), 4.5x ("past_key_values",
# "past_key_value").
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def _write_cache_stub(block: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> None:
    """An emptied attention still appends one zero of width 1 per position to its cache layer.

    The model reads the cached length from a cache layer (layer 0 for the positions, each layer for its mask): a
    layer that never writes reads as length 0, so later steps would get wrong positions and masks. The stub costs
    one value per token and is never attended to; exporters leave it out of the cache they expose.
    """
    cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    layer_idx = getattr(block, "layer_idx", None)
    if cache is None:
        return
    if layer_idx is None or not hasattr(cache, "update"):
        raise ValueError(f"gisp: an emptied attention block ({type(block).__name__}) was given a KV cache "
                         f"({type(cache).__name__}) but has no layer_idx to keep its length in step; run it without "
                         "a cache (use_cache=False)")
    batch, seq = hidden_states.shape[0], hidden_states.shape[1]
    stub = hidden_states.new_zeros((batch, 1, seq, 1))
    cache.update(stub, stub, layer_idx)


def empty_attention_layers(model: nn.Module) -> set[int]:
    """Indices of the decoder layers whose attention is an EmptyBlock (their cache holds only the stub)."""
    return {m.layer_idx for m in model.modules()
            if type(m).__name__ == "EmptyBlock" and m.returns_tuple and getattr(m, "layer_idx", None) is not None}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# config.gisp: section -> the keys each of its entries carries (None: plain values)
STRUCTURE_KEYS = {"linears": None, "attention": ("num_heads", "num_kv_heads", "kv_map"), "mlp": None,
                  "empty": ("hidden_size", "bias", "kind"), "base_attention": None}


def check_structure(structure) -> None:
    """A ValueError naming the first missing or malformed part of config.gisp, before any module is touched."""
    where = "config.json 'gisp' (the pruned structure)"
    if not isinstance(structure, dict):
        raise ValueError(f"{where} is a {type(structure).__name__}, expected an object")
    missing = [k for k in STRUCTURE_KEYS if k not in structure]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {', '.join(missing)}; the folder's config.json is damaged, "
                         "save the pruned model again")
    for section, keys in STRUCTURE_KEYS.items():
        if keys is None:
            continue
        if not isinstance(structure[section], dict):
            raise ValueError(f"{where}: '{section}' is a {type(structure[section]).__name__}, expected an object")
        for name, info in structure[section].items():
            lacking = [k for k in keys if not isinstance(info, dict) or k not in info]
            if lacking:
                raise ValueError(f"{where}: entry '{section}.{name}' lacks {', '.join(lacking)}; the folder's "
                                 "config.json is damaged, save the pruned model again")


def apply_structure_(model: nn.Module, structure: dict) -> None:
    """Give `model` the pruned shapes in `structure` (config.gisp); weights are whatever the caller loads next."""
    check_structure(structure)
    linearize_modules_(model, structure.get("linearized", ()))
    for name, (in_f, out_f, bias) in structure["linears"].items():
        old = model.get_submodule(name)
        if (old.in_features, old.out_features, old.bias is not None) != (in_f, out_f, bias):
            new = nn.Linear(in_f, out_f, bias=bias, device=old.weight.device, dtype=old.weight.dtype)
            _set_module(model, name, new)
    for name, info in structure["attention"].items():
        configure_attention_(model.get_submodule(name), info["num_heads"], info["num_kv_heads"], info["kv_map"])
    for name, channels in structure["mlp"].items():
        module = model.get_submodule(name)
        for attr in INTERMEDIATE_ATTRS:
            if hasattr(module, attr):
                setattr(module, attr, channels)
    for name, info in structure["empty"].items():
        block = EmptyBlock(info["hidden_size"], info["bias"], info["kind"] == "attention", model.get_submodule(name))
        _set_module(model, name, block)
    set_attention_impl_(model, structure["base_attention"])


def configure_attention_(module: nn.Module, num_heads: int, num_kv_heads: int, kv_map: list[int]) -> None:
    for attr in QUERY_HEAD_ATTRS:
        if hasattr(module, attr):
            setattr(module, attr, num_heads)
    for attr in KV_HEAD_ATTRS:
        if hasattr(module, attr):
            setattr(module, attr, num_kv_heads)
    groups = even_groups(num_heads, kv_map)
    if groups is not None and hasattr(module, "num_key_value_groups"):
        # every K/V head serves the same number of consecutive query heads: the model's own broadcast does it,
        # with no per-step gather of the cache
        module.num_key_value_groups = groups
        module.gisp_kv_map = None
    else:
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = 1  # K/V arrive already gathered per query head
        module.gisp_kv_map = tuple(kv_map)
    if hasattr(module, "config"):  # some forwards read head counts from the config: give this module its own
        module.config = copy.copy(module.config)
        module.config.num_attention_heads = num_heads
        module.config.num_key_value_heads = num_kv_heads
    fit_fused_widths_(module, num_heads)


def even_groups(num_heads: int, kv_map) -> int | None:
    """Query heads per K/V head when query head h reads K/V head h // groups for every h; None when uneven."""
    kv_heads = max(kv_map) + 1 if len(kv_map) else 0
    if not kv_heads or num_heads % kv_heads:
        return None
    groups = num_heads // kv_heads
    return groups if all(k == h // groups for h, k in enumerate(kv_map)) else None


def set_attention_impl_(model: nn.Module, base: str) -> None:
    name = base if calls_sdpa_itself(model) else gisp_implementation(base)
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


# -- model families: linear-like layers, fused widths, attention that bypasses the interface -----------------------
LINEARIZED_ATTR = "gisp_linearized"  # on the top model: modules replaced by plain nn.Linear (recorded in config.gisp)
# Attention modules that test `config._attn_implementation == "sdpa"` and call torch SDPA themselves: a gisp_ name
# would send them down their eager path. Their K/V heads need no gather (MHA or one broadcast K/V head), so the
# base name is kept. Declared, because no graph shows which branch an implementation name would take.
SELF_SDPA_MODEL_TYPES = ("falcon",)


def calls_sdpa_itself(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in SELF_SDPA_MODEL_TYPES


def linear_like(module: nn.Module) -> nn.Linear | None:
    """An empty nn.Linear of `module`'s shape if it is a Conv1D ([in, out] weight) or an nn.Linear subclass with a
    forward of its own (FalconLinear); None otherwise."""
    if isinstance(module, nn.Linear):
        if type(module).forward is nn.Linear.forward:
            return None
        in_f, out_f = module.in_features, module.out_features
    elif type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers."):
        in_f, out_f = module.weight.shape
    else:
        return None
    w = module.weight
    return nn.Linear(in_f, out_f, bias=module.bias is not None, device=w.device, dtype=w.dtype)


def linearize_modules_(model: nn.Module, names) -> None:
    """Rebuild as plain nn.Linear the modules a pruned model recorded as linearized (weights are loaded next)."""
    for name in names:
        new = linear_like(model.get_submodule(name))
        if new is not None:
            _set_module(model, name, new)
    setattr(model, LINEARIZED_ATTR, tuple(names))


def fit_fused_widths_(module: nn.Module, num_heads: int) -> None:
    """Widths a fused-projection attention splits by (GPT-2's `split_size` = heads * head_dim) follow the heads."""
    head_dim = getattr(module, "head_dim", None)
    if isinstance(getattr(module, "split_size", None), int) and isinstance(head_dim, int):
        module.split_size = num_heads * head_dim


def base_key_mapping(cls: type) -> dict[str, str] | None:
    """The checkpoint renamings transformers applies when loading the base class (GPT-NeoX: embed_out -> lm_head).

    Saving from the base class writes the checkpoint's names; transformers skips these renamings for custom code,
    so the pruned model asks for them by name. None on lines without conversion mappings (4.57 keeps the names).
    """
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return None
    base = next((c for c in cls.__mro__ if c.__module__.startswith("transformers.models.")), None)
    if base is None:
        return None
    conversions = get_checkpoint_conversion_mapping(base.__name__) or []
    mapping = {}
    for t in conversions:
        sources, targets = getattr(t, "source_patterns", None), getattr(t, "target_patterns", None)
        if type(t).__name__ == "WeightRenaming" and len(sources or ()) == 1 and len(targets or ()) == 1:
            mapping[sources[0]] = targets[0]
    return mapping or None


class GispMixin:
    """Mixed into the base architecture's *ForCausalLM class in each saved model's modeling file."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_structure_(self, config.gisp)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("key_mapping") is None and base_key_mapping(cls):
            kwargs["key_mapping"] = base_key_mapping(cls)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise ValueError(
                f"pruned model: weights missing ({sorted(info.get('missing_keys', []))[:5]}) or of the wrong shape "
                f"({list(info.get('mismatched_keys', []))[:5]}); the folder's safetensors do not match config.gisp"
            )
        set_attention_impl_(model, model.config.gisp["base_attention"])
        return (model, info) if want_info else model
