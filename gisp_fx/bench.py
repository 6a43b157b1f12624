"""Latency of dense vs pruned models, onnxruntime vs torch eager: prefill and decode, interleaved, medians.

Each target is one (model, engine) pair. Every repeat runs every target once, in a rotated order, so drifts of a
shared machine spread over all targets alike; the report quotes medians with min-max. A pruned model's speedup is
set beside its ideal: the ratio of parameters touched per token (embedding/LM head included), dense over pruned.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gisp_fx.errors import GispError

ENGINES = ("ort", "ort-int8", "ort-int4", "torch", "genai")


@dataclass(frozen=True)
class Target:
    label: str  # the model as given (folder, export or bundled name)
    engine: str  # ort | ort-int8 | torch
    opt: str  # onnxruntime graph optimisation level ('-' for torch)
    params: dict  # total, decoder, touched_per_token

    @property
    def name(self) -> str:
        return self.engine if self.engine in ("torch", "genai") else f"{self.engine} (opt {self.opt})"


@dataclass
class Row:
    target: Target
    samples: dict[str, list[float]] = field(default_factory=dict)  # metric -> ms (decode: ms per token)

    def median(self, metric: str) -> float:
        return statistics.median(self.samples[metric])


@dataclass(frozen=True)
class BenchSettings:
    prefill: tuple[int, ...] = (128, 512)
    prompt: int = 128
    decode: int = 64
    repeats: int = 5
    warmup: int = 1
    threads: int = 0  # 0: all cores
    provider: str = "cpu"
    seed: int = 0

    def metrics(self) -> list[str]:
        return [f"prefill_{n}" for n in self.prefill] + (["decode"] if self.decode else [])


# -- timers ------------------------------------------------------------------------------------------------------
class OrtTimer:
    def __init__(self, path: Path, provider: str, threads: int, opt: str):
        from gisp_fx.exporters.ort import OrtCausalLM

        self.model = OrtCausalLM(path, provider=provider, threads=threads, graph_optimization=opt)
        if not self.model.with_past:
            raise GispError(f"bench: '{path}' was exported without a KV cache; export it with --with-past")
        self.vocab = self.model.vocab_size

    def prefill(self, ids: np.ndarray) -> float:
        mask = np.ones_like(ids)
        t0 = time.perf_counter()
        self.model.step(ids, mask, np.arange(ids.shape[1])[None], np.array([ids.shape[1] - 1]))
        return time.perf_counter() - t0

    def decode(self, ids: np.ndarray, steps: int) -> float:
        mask = np.ones_like(ids)
        logits, past = self.model.step(ids, mask, np.arange(ids.shape[1])[None], np.array([ids.shape[1] - 1]),
                                       capacity=ids.shape[1] + steps)
        pos = ids.shape[1]
        t0 = time.perf_counter()
        for _ in range(steps):  # fixed length: EOS does not stop a timing run
            nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.ones((1, pos + 1), dtype=np.int64)
            logits, past = self.model.step(nxt, mask, np.array([[pos]]), np.array([0]), past)
            pos += 1
        return (time.perf_counter() - t0) / steps


class GenaiTimer:
    """An onnxruntime-genai model folder (genai_config.json), timed through og.Generator: the anchor rows."""

    def __init__(self, folder: Path, threads: int, provider: str, max_length: int):
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise GispError(f"bench: '{folder}' is an onnxruntime-genai model; `pip install onnxruntime-genai` "
                            "(make latency installs it) to time it") from exc
        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        if provider != "cpu":
            config.clear_providers()
            config.append_provider(provider)
        self.model = og.Model(config)
        self.max_length = max_length
        self.vocab = json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: np.ndarray) -> float:
        gen = self._generator(ids.shape[1] + 1)
        t0 = time.perf_counter()
        gen.append_tokens(ids.astype(np.int32))
        return time.perf_counter() - t0

    def decode(self, ids: np.ndarray, steps: int) -> float:
        gen = self._generator(ids.shape[1] + steps + 1)
        gen.append_tokens(ids.astype(np.int32))
        t0 = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        return (time.perf_counter() - t0) / steps


class TorchTimer:
    def __init__(self, model: torch.nn.Module, device: str):
        self.model = model.to(device).eval()
        self.device = device
        self.vocab = model.get_output_embeddings().weight.shape[0]

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def prefill(self, ids: np.ndarray) -> float:
        x = torch.from_numpy(ids).to(self.device)
        self._sync()
        t0 = time.perf_counter()
        self.model(input_ids=x, use_cache=False, logits_to_keep=1)
        self._sync()
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode(self, ids: np.ndarray, steps: int) -> float:
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(input_ids=torch.from_numpy(ids).to(self.device), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        self._sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = self.model(input_ids=nxt, past_key_values=cache, use_cache=True)
        self._sync()
        return (time.perf_counter() - t0) / steps


# -- targets -----------------------------------------------------------------------------------------------------
def is_onnx_export(spec: str) -> bool:
    p = Path(spec)
    # an export folder whose model.onnx is gone is still one (exporters/ort.py model_file says what is missing)
    return (p / "model.onnx").is_file() or (p / "gisp_onnx.json").is_file() or (p.is_file() and p.suffix == ".onnx")


def _export_params(meta_file: Path) -> dict:
    """The parameter counts an export recorded in its gisp_onnx.json, or a GispError naming the damage."""
    try:
        params = json.loads(meta_file.read_text(encoding="utf-8"))["params"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise GispError(f"bench: '{meta_file}' is not a valid gisp-fx export record ({type(exc).__name__}: {exc}); "
                        "export the model again with `gisp-fx export`") from exc
    keys = ("total", "decoder", "touched_per_token")
    if not isinstance(params, dict) or not all(isinstance(params.get(k), int) for k in keys):
        raise GispError(f"bench: '{meta_file}': 'params' must hold the integers {', '.join(keys)}; got {params!r}")
    return params


def is_genai_folder(spec: str) -> bool:
    p = Path(spec)
    return (p / "genai_config.json").is_file() and not (p / "gisp_onnx.json").is_file()


def make_targets(specs: list[str], engines: list[str], opts: list[str], settings: BenchSettings):
    """(Target, timer) pairs: ONNX exports run in onnxruntime, model folders/specs in torch eager."""
    from gisp_fx.exporters.onnx import INT8_FILE, META_FILE
    from gisp_fx.exporters.export import INT4_FILE
    from gisp_fx.exporters.ort import GRAPH_OPT, resolve_provider
    from gisp_fx.loading import load_model, param_counts

    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise GispError(f"bench: unknown engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    resolve_provider(settings.provider)  # fails early, listing the available providers
    bad = [o for o in opts if o not in GRAPH_OPT]
    if bad:
        raise GispError(f"bench: --ort-opt {','.join(bad)} is not an onnxruntime optimisation level; expected "
                        f"comma-separated {', '.join(GRAPH_OPT)}")
    device = "cuda" if settings.provider == "cuda" else "cpu"
    threads = settings.threads or os.cpu_count() or 1
    out = []
    for spec in specs:
        if is_genai_folder(spec):
            if "genai" not in engines:
                raise GispError(f"bench: '{spec}' is an onnxruntime-genai model; add 'genai' to --engines")
            meta = Path(spec) / "gisp_params.json"  # written by benchmarks/latency.py beside the genai build
            params = json.loads(meta.read_text()) if meta.is_file() else {}
            if not params:
                raise GispError(f"bench: '{spec}' has no gisp_params.json (parameter counts of the source model)")
            timer = GenaiTimer(Path(spec), threads, settings.provider, max(settings.prefill + (settings.prompt + settings.decode,)) + 2)
            out.append((Target(spec, "genai", "-", params), timer))
        elif is_onnx_export(spec):
            folder = Path(spec) if Path(spec).is_dir() else Path(spec).parent
            meta_file = folder / META_FILE
            if not meta_file.is_file():
                raise GispError(f"bench: '{folder}' has no {META_FILE}; bench ONNX folders written by gisp-fx export")
            params = _export_params(meta_file)
            for engine in [e for e in engines if e.startswith("ort")]:
                file = folder / {"ort-int8": INT8_FILE, "ort-int4": INT4_FILE}.get(engine, "model.onnx")
                if not file.is_file():
                    if engine != "ort":
                        continue  # this export has no int8 / int4 variant
                    raise GispError(f"bench: '{folder}' is a gisp-fx ONNX export but its model.onnx is missing; "
                                    "export it again with `gisp-fx export`")
                for opt in opts:
                    out.append((Target(spec, engine, opt, params), OrtTimer(file, settings.provider, threads, opt)))
        else:
            if "torch" not in engines:
                raise GispError(f"bench: '{spec}' is a model, not an ONNX export; it runs in torch, which "
                                f"--engines {','.join(engines)} leaves out")
            torch.set_num_threads(threads)
            model = load_model(spec, device=device).model
            out.append((Target(spec, "torch", "-", param_counts(model)), TorchTimer(model, device)))
    if not out:
        raise GispError("bench: nothing to time (give ONNX exports and/or model folders)")
    return out


def run_bench(specs: list[str], settings: BenchSettings, engines: list[str] | None = None,
              opts: list[str] | None = None, progress: bool = True) -> list[Row]:
    pairs = make_targets(specs, engines or ["ort", "torch"], opts or ["all"], settings)
    rng = np.random.default_rng(settings.seed)
    vocab = min(timer.vocab for _, timer in pairs)  # ids valid for every model; the content does not change the cost
    inputs = {f"prefill_{n}": rng.integers(3, vocab, (1, n)) for n in settings.prefill}
    prompt = rng.integers(3, vocab, (1, settings.prompt))
    rows = [Row(t) for t, _ in pairs]

    def once(i: int, record: bool) -> None:
        _, timer = pairs[i]
        for metric, ids in inputs.items():
            s = timer.prefill(ids)
            if record:
                rows[i].samples.setdefault(metric, []).append(1000 * s)
        if settings.decode:
            s = timer.decode(prompt, settings.decode)
            if record:
                rows[i].samples.setdefault("decode", []).append(1000 * s)

    total = (settings.warmup + settings.repeats) * len(pairs)
    with tqdm(total=total, desc="bench", unit="run", disable=not progress) as bar:
        for r in range(settings.warmup + settings.repeats):
            shift = r % len(pairs)
            for i in list(range(len(pairs)))[shift:] + list(range(len(pairs)))[:shift]:  # rotated, interleaved
                once(i, record=r >= settings.warmup)
                bar.update()
    return rows


# -- report ------------------------------------------------------------------------------------------------------
def summarise(rows: list[Row], settings: BenchSettings) -> list[dict]:
    """Per row: medians, min-max, sparsity, and speedup vs the densest row of the same engine beside its ideal."""
    out = []
    for row in rows:
        same = [r for r in rows if r.target.name == row.target.name]
        ref = max(same, key=lambda r: r.target.params["touched_per_token"])
        p, p0 = row.target.params, ref.target.params
        entry = {"model": row.target.label, "engine": row.target.engine, "opt": row.target.opt,
                 "name": row.target.name, "params": p,
                 "sparsity": 1 - p["decoder"] / p0["decoder"], "reference": ref.target.label,
                 "ideal": p0["touched_per_token"] / p["touched_per_token"], "metrics": {}}
        for metric in settings.metrics():
            xs = row.samples[metric]
            entry["metrics"][metric] = {"median_ms": statistics.median(xs), "min_ms": min(xs), "max_ms": max(xs),
                                        "samples_ms": xs, "speedup": ref.median(metric) / statistics.median(xs)}
        out.append(entry)
    return out


def _title(metric: str, settings: BenchSettings) -> str:
    if metric == "decode":
        return f"decode (ms/token, {settings.decode} tokens after {settings.prompt})"
    return f"prefill {metric.split('_')[1]} (ms)"


def markdown(summary: list[dict], settings: BenchSettings, environment: dict) -> str:
    metrics = settings.metrics()
    head = ["model", "engine", "sparsity", "params/token", *(_title(m, settings) for m in metrics), "ideal"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for e in summary:
        cells = [Path(e["model"]).name or e["model"], e["name"], f"{100 * e['sparsity']:.0f} %", f"{e['params']['touched_per_token'] / 1e6:.1f} M"]
        for m in metrics:
            x = e["metrics"][m]
            cells.append(f"{x['median_ms']:.1f} [{x['min_ms']:.1f}-{x['max_ms']:.1f}] **{x['speedup']:.2f}x**")
        cells.append(f"{e['ideal']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    env = ", ".join(f"{k} {v}" for k, v in environment.items())
    return "\n".join([
        f"Median [min-max] of {settings.repeats} interleaved runs after {settings.warmup} warm-up; bold: speedup over "
        "the densest model of the same engine; ideal: the ratio of parameters touched per token (embedding/LM head "
        f"included). Batch 1. {env}.", "", *lines, ""])


def environment(settings: BenchSettings) -> dict:
    import platform

    import onnxruntime

    return {"provider": settings.provider, "threads": settings.threads or os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}


def plot(summary: list[dict], settings: BenchSettings, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = settings.metrics()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), dpi=120, squeeze=False)
    names = list(dict.fromkeys(e["name"] for e in summary))
    for ax, metric in zip(axes[0], metrics):
        for i, name in enumerate(names):
            pts = sorted(((e["sparsity"], e) for e in summary if e["name"] == name), key=lambda t: t[0])
            if not pts:
                continue
            xs = [100 * s for s, _ in pts]
            color = f"C{i}"
            ax.plot(xs, [e["metrics"][metric]["median_ms"] for _, e in pts], "o-", color=color, label=name)
            ref = pts[0][1]["metrics"][metric]["median_ms"] * pts[0][1]["ideal"]  # the densest point's latency
            ax.plot(xs, [ref / e["ideal"] for _, e in pts], "--", color=color, alpha=0.5, lw=1)
            lo = [e["metrics"][metric]["min_ms"] for _, e in pts]
            hi = [e["metrics"][metric]["max_ms"] for _, e in pts]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
        ax.set_title(_title(metric, settings), fontsize=9)
        ax.set_xlabel("decoder sparsity (%)")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, title="dashed: ideal", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(summary: list[dict], settings: BenchSettings, output: str | os.PathLike, title: str,
                 extra: dict | None = None) -> Path:
    """bench.md + bench.json + bench.png, written to a temp folder and renamed into place."""
    from gisp_fx.save import staged_dir

    out = Path(output)
    env = environment(settings)
    doc = {"title": title, "settings": asdict(settings), "environment": env, "rows": summary, **(extra or {})}
    with staged_dir(out) as tmp:
        (tmp / "bench.json").write_text(json.dumps(doc, indent=1))
        (tmp / "bench.md").write_text(f"# {title}\n\n" + markdown(summary, settings, env))
        plot(summary, settings, tmp / "bench.png", title)
    return out
