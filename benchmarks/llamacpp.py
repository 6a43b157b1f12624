"""llama.cpp rows: the dense model and pruned models of a run, exported to GGUF (f16, q8_0, q4_k_m), timed in
llama.cpp (llama-cpp-python) in one interleaved loop, with gisp-fx's fused onnxruntime exports in the same loop
when given; plus the GGUF files' quality and parity against torch.

    python benchmarks/llamacpp.py RUN_DIR                        # `make latency-llamacpp`
    python benchmarks/llamacpp.py RUN_DIR --onnx runs/latency/onnx-0,runs/latency/onnx-50   # + onnxruntime rows

Steps: materialize each sparsity of the run's trajectory (reused under --runs), export the dense and pruned models to
f32 GGUF (timed) and from that to f16 (gisp-fx's writer), q8_0 and q4_k_m (llama.cpp's quantiser); greedy tokens of
the f32 files against torch; WikiText-2 perplexity of torch and of the f32, q8_0 and q4_k_m files on the same windows;
then, per thread count, prefill 128 and 512 and decode after 128 (batch 1), each row timed once per repeat in a
rotated order, and every row against llama.cpp's dense row at the same quantisation as paired ratios (per repeat
dense/row, then the median; >1: faster than dense). Writes llamacpp.json and llamacpp.md to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gisp_fx.bench import OrtTimer
from gisp_fx.evaluate import wikitext2_perplexity
from gisp_fx.exporters.gguf import export_gguf, source_gguf
from gisp_fx.loading import LoadedModel, load_model
from gisp_fx.rebuild import load_trajectory
from gisp_fx.rebuild import save_materialized as materialize

QUANTS = ("f16", "q8_0", "q4_k_m")
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]


def prepare(args) -> tuple[dict, dict, dict]:
    """{tag: {quant: gguf path}}, {tag: model spec}, {tag: seconds of the f32 export}; files reused when present."""
    traj = load_trajectory(args.run_dir)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    tokenizer = source_gguf(args.run_dir)
    given = dict(x.split("=", 1) for x in args.models.split(",") if x)  # tag=folder: pruned models as they are
    files, specs, export_s = {}, {}, {}
    for s in [0.0, *[float(x) for x in args.sparsities.split(",")]]:
        tag = f"{round(100 * s)}"
        spec = traj.config["model"] if s == 0.0 else given.get(tag) or str(runs / f"model-{tag}")
        if s and not (Path(spec) / "config.json").is_file():
            materialize(args.run_dir, s, spec, overwrite=True)
        specs[tag] = spec
        files[tag] = {q: runs / f"gguf-{tag}-{q}.gguf" for q in ("f32", *QUANTS)}
        record = runs / f"gguf-{tag}-f32.json"
        missing = [q for q in ("f32", *QUANTS) if not files[tag][q].is_file()]
        if missing:
            loaded = load_model(spec)
            for q in missing:  # q8_0 / q4_k_m: written from f32 with MLP widths rounded up to 32, then quantised
                result = export_gguf(loaded, files[tag][q], q, tokenizer_gguf=tokenizer)
                if q == "f32":
                    record.write_text(json.dumps({"seconds": result.seconds,
                                                  "layers": [vars(x) for x in result.layers]}))
                print(f"{tag} %: {q} GGUF in {result.seconds:.1f} s", flush=True)
        export_s[tag] = json.loads(record.read_text())["seconds"]
    return files, specs, export_s


class LlamaCppTimer:
    """A GGUF file in llama.cpp (llama-cpp-python's defaults otherwise: f16 KV cache, its flash-attention default)."""

    def __init__(self, path: Path, threads: int, ctx: int, flash_attn: bool = False):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=flash_attn, verbose=False)
        self.vocab = self.llm.n_vocab()

    def prefill(self, ids: np.ndarray) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids[0].tolist())
        return time.perf_counter() - t0

    def decode(self, ids: np.ndarray, steps: int) -> float:
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        t0 = time.perf_counter()
        for _ in range(steps):  # fixed length: EOS does not stop a timing run
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return (time.perf_counter() - t0) / steps

    def close(self) -> None:
        self.llm.close()


def time_rows(targets: list[tuple[str, str, object]], repeats: int, warmup: int, decode: int) -> dict:
    """{(model, engine): {metric: [ms per repeat]}}: every target once per repeat, the order rotated each repeat."""
    rng = np.random.default_rng(0)
    vocab = min(t.vocab for _, _, t in targets)
    inputs = {f"prefill_{n}": rng.integers(3, vocab, (1, n)) for n in (128, 512)}
    prompt = rng.integers(3, vocab, (1, 128))
    out = {(m, e): {} for m, e, _ in targets}
    for r in range(warmup + repeats):
        shift = r % len(targets)
        for model, engine, timer in targets[shift:] + targets[:shift]:
            got = {k: timer.prefill(ids) for k, ids in inputs.items()}
            got["decode"] = timer.decode(prompt, decode)
            if r >= warmup:
                for k, v in got.items():
                    out[(model, engine)].setdefault(k, []).append(1000 * v)
        print(f"  repeat {r + 1}/{warmup + repeats}", flush=True)
    return out


def paired(samples: dict, row: tuple, ref: tuple) -> dict:
    return {m: statistics.median(a / b for a, b in zip(samples[ref][m], samples[row][m])) for m in samples[row]}


class LlamaLogits:
    """A GGUF file scored as the perplexity code calls a model: model(input_ids=ids).logits (f32 KV cache)."""

    def __init__(self, path: Path, threads: int, ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, type_k=0, type_v=0, verbose=False)
        self.device = torch.device("cpu")

    def eval(self):
        return self

    def __call__(self, input_ids, **_):
        rows = []
        for ids in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(ids)
            rows.append(np.array(self.llm.scores[:len(ids)]))
        return type("Out", (), {"logits": torch.from_numpy(np.stack(rows))})()


def greedy(files: dict, specs: dict, new_tokens: int, threads: int) -> list[dict]:
    """32 greedy tokens from the f32 GGUF (llama.cpp, f32 KV cache) against torch's, per prompt."""
    import llama_cpp

    out = []
    for tag, spec in specs.items():
        loaded = load_model(spec)
        llm = llama_cpp.Llama(str(files[tag]["f32"]), n_ctx=256, n_threads=threads, type_k=0, type_v=0,
                              verbose=False)
        for prompt in PROMPTS:
            ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                want = loaded.model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                             pad_token_id=loaded.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
            llm.reset()
            got = []
            for tok in llm.generate(ids[0].tolist(), top_k=1, temp=0.0, reset=True):
                got.append(int(tok))
                if len(got) == new_tokens or tok == llm.token_eos():
                    break
            got = got[:len(want)]
            out.append({"model": tag, "prompt": prompt, "equal": got == want, "torch": want, "llama.cpp": got})
            print(f"greedy {tag} %: {'equal' if got == want else 'DIFFERENT'} ({len(want)} tokens)", flush=True)
        llm.close()
    return out


def quality(files: dict, specs: dict, windows: int, threads: int, variants=("f32", "q8_0", "q4_k_m")) -> list[dict]:
    rows = []
    for tag, spec in specs.items():
        loaded = load_model(spec)
        torch.set_num_threads(threads)
        ppl = wikitext2_perplexity(loaded.model, loaded.tokenizer, windows=windows, desc=f"torch {tag}")
        rows.append({"model": tag, "variant": "torch fp32", "ppl": ppl.ppl, "windows": ppl.subset})
        print(f"{tag} % torch: ppl {ppl.ppl:.3f}", flush=True)
        for q in variants:
            scorer = LlamaLogits(files[tag][q], threads, ctx=ppl.seq_len)
            p = wikitext2_perplexity(scorer, loaded.tokenizer, windows=windows, batch_size=4, desc=f"{q} {tag}")
            scorer.llm.close()
            rows.append({"model": tag, "variant": f"llama.cpp {q}", "ppl": p.ppl, "windows": p.subset,
                         "vs_torch": p.ppl / ppl.ppl - 1})
            print(f"{tag} % {q}: ppl {p.ppl:.3f} ({100 * (p.ppl / ppl.ppl - 1):+.2f} % vs torch)", flush=True)
    return rows


METRICS = ("prefill_128", "prefill_512", "decode")


def render(doc: dict) -> str:
    """llamacpp.md from llamacpp.json: the timing runs, parity and quality, export seconds, each with its command."""
    lines = ["# llama.cpp: dense against pruned GGUF exports", "",
             f"Machine: {doc['environment']}. Shared with other jobs: medians and paired ratios, not absolute times, "
             "are what to read.", ""]
    for run in doc.get("runs", []):
        lines += [f"## {run['threads']} thread(s){', flash attention' if run.get('flash_attn') else ''}: medians of {run['repeats']} rotated repeats (ms; decode: ms/token "
                  f"after 128) and paired ratios against llama.cpp's dense row at the same quantisation "
                  "(>1: faster than dense)", "", f"Command: `{run['command']}`", "",
                  "| model | engine | " + " | ".join(METRICS) + " | " + " | ".join(f"{m} vs dense" for m in METRICS)
                  + " |", "|---|---|" + "---:|" * 6]
        for row in run["rows"]:
            if "vs_dense_same_quant" in row:
                ratios = [f"{row['vs_dense_same_quant'][m]:.2f}x" for m in METRICS]
            else:
                ratios = [" / ".join(f"{v[m]:.2f}x" for v in row["llama_dense_vs_row"].values()) for m in METRICS]
            model = row["model"]
            name = "dense" if model == "0" else f"{model} %" if model.isdigit() else model
            lines.append(f"| {name} | {row['engine']} | " + " | ".join(f"{row['median_ms'][m]:.1f}" for m in METRICS)
                         + " | " + " | ".join(ratios) + " |")
        if any("llama_dense_vs_row" in r for r in run["rows"]):
            lines += ["", "onnxruntime rows (gisp-fx's fused fp32 exports): the ratio columns are llama.cpp's dense "
                      "f16 / q8_0 / q4_k_m time over the row's (>1: the row is faster than llama.cpp dense)."]
        lines.append("")
    if "quality" in doc:
        q = doc["quality"]
        lines += ["## Parity and quality against torch", "", f"Command: `{q['command']}`", ""]
        if q["greedy"]:
            lines += ["Greedy, f32 GGUF (f32 KV cache), 32 new tokens: " + "; ".join(
                f"{g['model']} % '{g['prompt'][:24]}…' {'equal' if g['equal'] else 'DIFFERENT'}"
                for g in q["greedy"]), ""]
        lines += [f"WikiText-2 perplexity ({q['windows']} test windows of 128 tokens, evenly spaced, the same for "
                  "every row):", "", "| model | variant | ppl | vs torch |", "|---|---|---:|---:|"]
        lines += [f"| {r['model']} % | {r['variant']} | {r['ppl']:.3f} | "
                  + (f"{100 * r['vs_torch']:+.2f} %" if "vs_torch" in r else "") + " |" for r in q["ppl"]]
        lines.append("")
    if "export_f32_s" in doc:
        lines += ["f32 GGUF export, written from the model in memory (s): "
                  + ", ".join(f"{t} %: {s:.1f}" for t, s in doc["export_f32_s"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", default="runs/smollm2-gisp-50")
    ap.add_argument("--sparsities", default="0.2,0.5")
    ap.add_argument("--runs", default="runs/llamacpp", help="materialized models and GGUF files (reused)")
    ap.add_argument("--models", default="",
                    help="comma-separated TAG=FOLDER (e.g. 20=runs/w20): pruned model folders used as they are "
                         "instead of materializing the run's trajectory at that sparsity")
    ap.add_argument("--onnx", default="", help="comma-separated fused ONNX exports to time in the same loop")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--quants", default=",".join(QUANTS), help="quantisations timed (default f16,q8_0,q4_k_m)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per timing run, after 128")
    ap.add_argument("--windows", type=int, default=256, help="WikiText-2 test windows for the perplexity rows")
    ap.add_argument("--quality-models", default="0,50", help="tags whose greedy tokens and perplexity are measured")
    ap.add_argument("--ppl-variants", default="f32,q8_0,q4_k_m", help="GGUF files scored beside torch")
    ap.add_argument("--skip-greedy", action="store_true")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention (default: off, "
                    "llama-cpp-python's default; off, llama.cpp pads every layer's V cache to the widest layer)")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--output", default="benchmarks/results/llamacpp")
    args = ap.parse_args()
    command = shlex.join(["python", "benchmarks/llamacpp.py", *sys.argv[1:]])
    files, specs, export_s = prepare(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "llamacpp.json"
    doc = json.loads(record.read_text()) if record.is_file() else {}  # a partial run keeps the other sections
    doc["export_f32_s"] = export_s
    doc["environment"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "loadavg_at_start": [round(x, 1) for x in os.getloadavg()], "nice": os.nice(0),
                          "llama_cpp_python": __import__("llama_cpp").__version__}

    def save() -> None:  # re-read first: a quality run and a timing run may write the same record
        merged = json.loads(record.read_text()) if record.is_file() else {}
        merged.update({k: v for k, v in doc.items() if k in mine})
        record.write_text(json.dumps(merged, indent=1))
        (out / "llamacpp.md").write_text(render(merged))

    mine = {"export_f32_s", "environment"} | ({"quality"} if not args.skip_quality else set()) | (
        {"runs"} if not args.skip_timing else set())

    threads = [int(t) for t in args.threads.split(",")]
    if not args.skip_quality:
        chosen = {t: specs[t] for t in args.quality_models.split(",")}
        doc["quality"] = {"command": command, "windows": args.windows,
                          "greedy": [] if args.skip_greedy else greedy(files, chosen, 32, threads[0]),
                          "ppl": quality(files, chosen, args.windows, threads[0], args.ppl_variants.split(","))}
        save()
    onnx = [Path(x) for x in args.onnx.split(",") if x]
    if not args.skip_timing:
        doc["runs"] = []
    for n in ([] if args.skip_timing else threads):
        quants = args.quants.split(",")
        targets = [(tag, f"llama.cpp {q}", LlamaCppTimer(files[tag][q], n, 640, args.flash_attn)) for tag in specs for q in quants]
        targets += [(d.name, "ort fused fp32", OrtTimer(d, "cpu", n, "all")) for d in onnx]
        samples = time_rows(targets, args.repeats, args.warmup, args.decode)
        for _, _, t in targets:
            if hasattr(t, "close"):
                t.close()
        rows = []
        for (model, engine), s in samples.items():
            row = {"model": model, "engine": engine, "median_ms": {m: statistics.median(v) for m, v in s.items()},
                   "samples_ms": s}
            if engine.startswith("llama.cpp"):
                row["vs_dense_same_quant"] = paired(samples, (model, engine), ("0", engine))
            else:  # our onnxruntime export against llama.cpp's dense model, at each quantisation
                row["llama_dense_vs_row"] = {q: paired(samples, (model, engine), ("0", f"llama.cpp {q}"))
                                             for q in quants}
            rows.append(row)
        doc["runs"].append({"threads": n, "repeats": args.repeats, "decode_tokens": args.decode, "command": command,
                            "flash_attn": args.flash_attn,
                            "loadavg_at_end": [round(x, 1) for x in os.getloadavg()], "rows": rows})
        save()
        print(render({"environment": doc["environment"], "runs": doc["runs"][-1:]}), flush=True)
    save()
    print(f"report: {out}/llamacpp.md")


if __name__ == "__main__":
    main()
