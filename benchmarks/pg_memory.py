"""Peak memory of pg against GISP's gradient scoring (with and without activation checkpointing): a 4-layer model of
width 512 / 2048 pruned to 30 % at 16 x 128 tokens, each run a fresh process; writes
benchmarks/results/pg-memory.json.

    python benchmarks/pg_memory.py

A backward keeps the weights' gradients and, without checkpointing, every layer's activations of the batch; pg's
forward passes keep neither, so pg's growth should stay well below GISP's (it measured below 0.85x of checkpointed
GISP and below 0.6x of GISP without checkpointing when this was a unit test)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Peak RSS from /proc's VmHWM, which belongs to this process's own memory map: ru_maxrss would carry over, through
# fork and exec, the peak of the process that spawned it.
PEAK = """
import re, sys, torch, transformers
def peak_kb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
sys.path.insert(0, {tests!r})
from conftest import tiny_tokenizer
from gisp_fx.config import CompileConfig
from gisp_fx.loading import LoadedModel
from gisp_fx.passes.importance import LmCalibration
from gisp_fx.compile import compile_model
config = transformers.LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=64)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(config).eval()
calib = LmCalibration(torch.randint(3, 96, (16, 128), generator=torch.Generator().manual_seed(0)), batch_size=16)
base = peak_kb()
cfg = CompileConfig(model="tiny", sparsity=0.3, output={out!r}, method={method!r}, protect="none", eval_windows=1,
                    **(dict(pg_iters=2) if {method!r} == "pg" else dict(checkpoint={checkpoint!r})))
compile_model(cfg, calibration=calib, loaded=LoadedModel(model, tiny_tokenizer(), "tiny"), progress=False)
print(peak_kb() - base)
"""


def main() -> None:
    growth = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, method, checkpoint in (("pg", "pg", None), ("gisp", "oneshot", "on"),
                                         ("gisp-no-ckpt", "oneshot", "off")):
            script = PEAK.format(tests=str(ROOT / "tests"), out=str(Path(tmp) / name), method=method,
                                 checkpoint=checkpoint)
            done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
            growth[name] = int(done.stdout.split()[-1])
    doc = {"peak_growth_kb": growth, "pg_over_gisp": growth["pg"] / growth["gisp"],
           "pg_over_gisp_no_checkpoint": growth["pg"] / growth["gisp-no-ckpt"]}
    out = ROOT / "benchmarks" / "results" / "pg-memory.json"
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
