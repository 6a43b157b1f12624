"""OrtCausalLM: run a gisp-fx ONNX export in onnxruntime, with a KV cache whose shape is read per layer from the graph.

It also answers the small part of the HF model interface that gisp-fx's evaluators use (`model(...)`.logits,
`generate`, `device`, `eval`), so `gisp-fx eval ONNX_DIR` scores an export exactly as it scores a torch model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from gisp_fx.errors import GispError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
GRAPH_OPT = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
             "all": "ORT_ENABLE_ALL"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    names = {v: k for k, v in PROVIDERS.items()}
    return [names[p] for p in ort.get_available_providers() if p in names]


def resolve_provider(provider: str) -> str:
    """'cpu' | 'cuda' -> the onnxruntime provider name, or a clear error listing what this install has."""
    have = available_providers()
    if provider not in PROVIDERS or provider not in have:
        raise GispError(f"provider '{provider}' is not available in this onnxruntime; available: {', '.join(have)}"
                        + ("" if provider in PROVIDERS else f" (known names: {', '.join(PROVIDERS)})"))
    return PROVIDERS[provider]


def model_file(path: str | os.PathLike) -> Path:
    """A folder holding model.onnx, or an .onnx file itself."""
    p = Path(path)
    file = p / "model.onnx" if p.is_dir() else p
    if p.is_dir() and not file.is_file() and (p / "gisp_onnx.json").is_file():
        raise GispError(f"'{path}' is a gisp-fx ONNX export (it has gisp_onnx.json) but its model.onnx is missing; "
                        "export it again with `gisp-fx export`")
    if not file.is_file() or file.suffix != ".onnx":
        raise GispError(f"'{path}': expected an ONNX export (a folder with model.onnx, as written by "
                        "`gisp-fx export`, or an .onnx file)")
    return file


@dataclass(frozen=True)
class PastSpec:
    layer: int
    heads: int
    head_dim: int


class OrtCausalLM:
    """A decoder exported by `gisp-fx export`, in one onnxruntime session."""

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 graph_optimization: str = "all"):
        import onnxruntime as ort

        self.path = model_file(path)
        self.provider = provider
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPT[graph_optimization])
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = _session(self.path, opts, resolve_provider(provider))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        need = {"input_ids", "attention_mask", "position_ids", "logits_positions"}
        if not need <= set(self.inputs):
            raise GispError(f"'{self.path}': not a gisp-fx decoder export (inputs {sorted(self.inputs)}; expected "
                            f"{sorted(need)} and optionally past_key_values.*)")
        self.past: list[PastSpec] = []
        for name, info in self.inputs.items():
            m = PAST.fullmatch(name)
            if m and m.group(2) == "key":
                heads, dim = info.shape[1], info.shape[3]
                if not (isinstance(heads, int) and isinstance(dim, int)):
                    raise GispError(f"'{self.path}': input {name} has symbolic heads/head_dim {info.shape}")
                self.past.append(PastSpec(int(m.group(1)), heads, dim))
        self.past.sort(key=lambda s: s.layer)
        first = self.inputs.get(f"past_key_values.{self.past[0].layer}.key") if self.past else None
        self.cache_dtype = np.float16 if first is not None and "float16" in first.type else np.float32
        self.vocab_size = self.session.get_outputs()[0].shape[-1]
        self.fused = _attention_op(self.path) == "GroupQueryAttention"
        self.eos_token_ids, self.pad_token_id = _generation_defaults(self.path.parent)
        self.device = torch.device("cpu")  # where callers hand tensors in and get them back

    @property
    def with_past(self) -> bool:
        return bool(self.past)

    @property
    def shares_cache(self) -> bool:
        """Whether `step` hands each layer's attention one buffer as both past and present (the fused graph's
        GroupQueryAttention writes the new positions in place), rather than a past that the graph copies."""
        return self.with_past and self.fused

    def eval(self) -> "OrtCausalLM":
        return self

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {f"past_key_values.{s.layer}.{kind}": np.zeros((batch, s.heads, 0, s.head_dim), self.cache_dtype)
                for s in self.past for kind in ("key", "value")}

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            logits_positions: np.ndarray, past: dict[str, np.ndarray] | None = None):
        """One call of the graph: (logits [batch, n, vocab], present {past name: array})."""
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64), "logits_positions": logits_positions.astype(np.int64)}
        if self.past:
            feed.update(past if past is not None else self.empty_past(input_ids.shape[0]))
        outs = self.session.run(self.output_names, feed)
        present = {name.replace("present.", "past_key_values.", 1): value
                   for name, value in zip(self.output_names[1:], outs[1:])}
        return outs[0], present

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             logits_positions: np.ndarray, past=None, capacity: int | None = None):
        """`run` through an IO binding: the cache stays in onnxruntime's memory (on the GPU under CUDA) between
        steps, and only the logits come back to the host. Returns (logits, the cache to pass to the next step).

        A fused graph gets a `SharedCache`: one buffer per layer and kind of `capacity` positions (default: this
        step's length rounded up to 64; it grows by doubling when a step outruns it) that GroupQueryAttention
        reads as past and writes as present, so no step copies the cache. Other graphs get their present K/V as
        OrtValues, each step's a new copy one position longer."""
        binding = self.session.io_binding()
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                            ("position_ids", position_ids), ("logits_positions", logits_positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(value, dtype=np.int64))
        binding.bind_output("logits", "cpu")
        total = attention_mask.shape[1]
        if self.shares_cache:
            cache = past if past is not None else SharedCache(self, input_ids.shape[0], capacity or total)
            cache.reserve(total)
            for name, value in cache.buffers.items():
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(name.replace("past_key_values.", "present.", 1), value)
            self.session.run_with_iobinding(binding)
            cache.length = total
            return binding.get_outputs()[0].numpy(), cache
        import onnxruntime as ort

        if past is None:
            past = {k: ort.OrtValue.ortvalue_from_numpy(v, self.device_name, 0)
                    for k, v in self.empty_past(input_ids.shape[0]).items()}
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device_name)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        present = {name.replace("present.", "past_key_values.", 1): value
                   for name, value in zip(self.output_names[1:], outs[1:])}
        return outs[0].numpy(), present

    @property
    def device_name(self) -> str:
        return "cuda" if self.provider == "cuda" else "cpu"

    # the slice of the HF interface the evaluators use
    def __call__(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep: int = 0,
                 use_cache: bool | None = None, **unsupported):
        """Logits of one uncached forward (`use_cache` is accepted and has nothing to turn off); any other keyword
        is refused: a silently dropped `labels` or `past_key_values` would return something else."""
        if unsupported:
            raise GispError(f"OrtCausalLM: {', '.join(sorted(unsupported))} not supported; a call takes input_ids, "
                            "attention_mask, position_ids and logits_to_keep (generate() decodes with the cache)")
        ids = _numpy(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else _numpy(attention_mask)
        positions = positions_from_mask(mask) if position_ids is None else _numpy(position_ids)
        seq = ids.shape[1]
        keep = np.arange(seq - logits_to_keep if logits_to_keep else 0, seq)
        logits, _ = self.run(ids, mask, positions, keep)
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 **unsupported) -> torch.Tensor:
        """Greedy or sampled continuation of a (left-padded) batch with the KV cache; returns prompt + new ids.

        As HF `generate`: EOS and pad ids default to the export's generation_config.json, and a row that has
        produced EOS is filled with the pad id until every row has.
        """
        if unsupported:  # refused, not ignored: a silently dropped num_beams would decode something else
            raise GispError(f"OrtCausalLM.generate: {', '.join(sorted(unsupported))} not supported; it decodes "
                            "greedily or by sampling (do_sample, temperature, top_k, top_p, seed) with max_new_tokens, "
                            "eos_token_id and pad_token_id")
        if not self.past:
            raise GispError(f"'{self.path}' was exported without a KV cache; re-export with --with-past to generate")
        ids = _numpy(input_ids).astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else _numpy(attention_mask).astype(np.int64)
        rng = np.random.default_rng(seed)
        batch = ids.shape[0]
        done = np.zeros(batch, dtype=bool)
        eos = self.eos_token_ids if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        pad = pad if pad is not None else (eos[0] if eos else 0)
        positions = positions_from_mask(mask)
        step_ids, past, out = ids, None, [ids]
        for _ in range(max_new_tokens):
            # logits at the last position only: prefill computes one row of the LM head, not seq rows
            logits, past = self.step(step_ids, mask, positions, np.array([step_ids.shape[1] - 1]), past,
                                     capacity=ids.shape[1] + max_new_tokens)
            nxt = pick_next(logits[:, -1].astype(np.float32), do_sample, temperature, top_k, top_p, rng)
            nxt = np.where(done, pad, nxt)
            out.append(nxt[:, None])
            if eos:
                done |= np.isin(nxt, eos)
                if done.all():
                    break
            step_ids = nxt[:, None]
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        return torch.from_numpy(np.concatenate(out, axis=1))


class SharedCache:
    """The KV cache of a fused graph: per layer and kind one [batch, kv_heads, capacity, head_dim] buffer in
    onnxruntime's memory, bound as both past and present; the first `length` positions are filled. Positions past
    `length` are never read (GroupQueryAttention attends to `seqlens_k + 1` keys), so new buffers are left
    uninitialised."""

    STEP = 64  # capacities are multiples of this

    def __init__(self, model: "OrtCausalLM", batch: int, capacity: int):
        self.model, self.batch, self.length = model, batch, 0
        self.capacity = 0
        self.buffers: dict = {}
        self.reserve(capacity)

    def _new(self, spec: PastSpec, capacity: int):
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type((self.batch, spec.heads, capacity, spec.head_dim),
                                                         self.model.cache_dtype, self.model.device_name, 0)

    def reserve(self, total: int) -> None:
        """Room for `total` positions: a larger buffer (twice the old capacity at least) with the filled part
        copied over, when the current one is too small."""
        if total <= self.capacity:
            return
        capacity = -(-max(total, 2 * self.capacity) // self.STEP) * self.STEP
        buffers = {}
        for spec in self.model.past:
            for kind in ("key", "value"):
                name = f"past_key_values.{spec.layer}.{kind}"
                new = self._new(spec, capacity)
                if self.length:
                    full = np.empty((self.batch, spec.heads, capacity, spec.head_dim), self.model.cache_dtype)
                    full[:, :, :self.length] = self.buffers[name].numpy()[:, :, :self.length]
                    new.update_inplace(full)
                buffers[name] = new
        self.buffers, self.capacity = buffers, capacity

    def numpy(self) -> dict[str, np.ndarray]:
        """The filled positions, {past name: [batch, kv_heads, length, head_dim]} (as a growing cache holds them)."""
        return {name: value.numpy()[:, :, :self.length] for name, value in self.buffers.items()}


def _attention_op(path: Path) -> str | None:
    """The attention op of an export's graph: 'GroupQueryAttention' for the fused graph, else None."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return "GroupQueryAttention" if any(n.op_type == "GroupQueryAttention" for n in graph.node) else None


def _session(path: Path, opts, provider: str):
    """An onnxruntime session of `path`, or a GispError when the file is not a loadable ONNX model."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    try:
        return ort.InferenceSession(str(path), opts, providers=[provider])
    except (state.Fail, state.InvalidProtobuf, state.InvalidGraph, state.InvalidArgument, state.NoSuchFile,
            state.NotImplemented, state.RuntimeException) as exc:
        raise GispError(f"'{path}': onnxruntime cannot load it ({str(exc).strip()[:300]}); the export is damaged, "
                        "truncated or missing its .data file: export it again with `gisp-fx export`") from exc


def _generation_defaults(folder: Path) -> tuple[list[int], int | None]:
    """EOS ids and pad id from the export's generation_config.json (else config.json), as HF generate reads them."""
    import json

    for name in ("generation_config.json", "config.json"):
        file = folder / name
        if file.is_file():
            try:
                cfg = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise GispError(f"'{file}' is not valid JSON ({exc}); the export is damaged: export it again") from exc
            eos = cfg.get("eos_token_id")
            eos = [] if eos is None else np.atleast_1d(eos).tolist()
            return eos, cfg.get("pad_token_id")
    return [], None


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: each row counts from 0 at its first real token (as HF generate does)."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


def pick_next(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
              rng: np.random.Generator) -> np.ndarray:
    if not do_sample:
        return logits.argmax(-1).astype(np.int64)
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        cut = np.cumsum(sorted_p, -1) - sorted_p >= top_p  # drop a token once the ones before it reach top_p
        sorted_p[cut] = 0
        probs = np.zeros_like(probs)
        np.put_along_axis(probs, order, sorted_p, -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
