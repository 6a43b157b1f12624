"""GGUF export for llama.cpp (exporters/gguf.py): what the file holds, read back with the `gguf` package, and what
llama.cpp computes from it (llama-cpp-python, installed into the test venv by `make test`) against torch."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

from conftest import tiny_model
from gisp_fx.errors import GispError
from gisp_fx.exporters import gguf as gguf_export
from gisp_fx.exporters.gguf import export_gguf
from gisp_fx.exporters.gguf_vocab import read_fields
from gisp_fx.loading import LoadedModel
from gisp_fx.passes.shrink import shrink_
from gisp_fx.passes.analyse import analyse
from gisp_fx.plan import GroupRef, Kind, Selection
from test_rewrite import SELECTION, UNEVEN

H, C = Kind.HEAD, Kind.CHANNEL
# layer 0 loses all its heads (llama.cpp needs heads in layer 0: a zero stub head), layer 2 all its channels
ATTN0 = Selection(tuple(GroupRef(0, H, h) for h in range(4)) + tuple(GroupRef(2, C, c) for c in range(48)))
# SELECTION: layer 0 keeps 1 head, layer 1 loses its attention, layer 2 its MLP; UNEVEN: groups of 2+1 heads
CASES = {"dense": None, "uneven": UNEVEN, "emptied": SELECTION, "emptied-attn0": ATTN0}
# f32 weights and an f32 KV cache: llama.cpp's logits against torch's, on logits that span about +-1 (tiny models;
# measured at most 3.6e-7 over the cases below, Llama and Qwen2)
BOUND = 1e-5

try:
    import llama_cpp
except ImportError:  # `make test` installs it (make .venv/.llama-installed); a bare pip install -e . does not
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed: run `make test`, "
                                                           "which installs it (target .venv/.llama-installed)")


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer) trained in-process: the kind written from HF files."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["pruned models run in llama"],
                            trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


@functools.lru_cache(maxsize=None)
def pruned(arch: str, case: str, tokenizer) -> torch.nn.Module:
    """A tiny model pruned as CASES[case] says; built once per session (the exporter does not change it)."""
    model = tiny_model(arch, vocab_size=len(tokenizer))
    if CASES[case] is not None:
        shrink_(model, analyse(model), CASES[case])
    return model


def llama_logits(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`, f32 KV cache (type 0), one thread."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, n_threads=1, logits_all=True, type_k=0, type_v=0,
                          verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)])
    llm.close()
    return out


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return bpe_tokenizer()


@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_gguf_read_back(arch, case, tok, tmp_path):
    from gguf import GGUFReader

    model = pruned(arch, case, tok)
    result = export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "m.gguf")
    reader = GGUFReader(str(result.path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert meta["general.architecture"] == "deci" and meta["deci.block_count"] == 3
    heads, kv, ff = (meta[f"deci.{k}"] for k in ("attention.head_count", "attention.head_count_kv",
                                                   "feed_forward_length"))
    expected = {"dense": ([4, 4, 4], [2, 2, 2], [48, 48, 48]),
                "uneven": ([4, 2, 4], [2, 2, 2], [48, 48, 48]),  # layer 0: 2+1 heads, padded to 2+2
                "emptied": ([1, 0, 4], [1, 0, 2], [46, 48, 1]),  # layer 2: MLP gone, one zero channel kept
                "emptied-attn0": ([1, 4, 4], [1, 2, 2], [48, 48, 1])}[case]  # layer 0: one zero stub head
    assert (heads, kv, ff) == expected
    assert meta["gisp.zero_query_heads"] == ([1, 0, 0] if case == "uneven" else [0, 0, 0])
    assert meta["gisp.stub_attention"] == ([1, 0, 0] if case == "emptied-attn0" else [0, 0, 0])
    assert meta["gisp.stub_mlp"] == ([0, 0, 1] if case in ("emptied", "emptied-attn0") else [0, 0, 0])
    if case == "uneven":
        assert meta["gisp.query_order.0"] == [0, -1, 1, 2]
    for i in range(3):  # ggml order: (in, out)
        if heads[i]:
            assert shapes[f"blk.{i}.attn_q.weight"] == (64, 16 * heads[i])
            assert shapes[f"blk.{i}.attn_k.weight"] == (64, 16 * kv[i])
            assert shapes[f"blk.{i}.attn_output.weight"] == (16 * heads[i], 64)
            assert (f"blk.{i}.attn_q.bias" in shapes) == (arch == "qwen2" and not result.layers[i].stub_attention)
        else:
            assert not any(n.startswith(f"blk.{i}.attn") for n in shapes)
        assert shapes[f"blk.{i}.ffn_down.weight"] == (ff[i], 64)
    assert shapes["token_embd.weight"] == (64, len(tok)) and "output.weight" in shapes  # untied head
    assert [lay.heads for lay in result.layers] == heads and result.tokenizer == "hf:bpe"
    copied = {f[0]: f[1] for f in read_fields(result.path)}  # the header reader that copies a source GGUF's vocab
    assert set(copied) == {k for k in reader.fields if k.startswith("tokenizer.")}
    assert [t.decode() for t in copied["tokenizer.ggml.tokens"]] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert copied["tokenizer.ggml.token_type"] == reader.fields["tokenizer.ggml.token_type"].contents()
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_rope_permutation_pairs_halves():
    w = np.arange(8, dtype=np.float32)[:, None]  # one head of 8 rows: x0..x3 then y0..y3
    assert gguf_export._rope_rows(w, 1, 8)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@needs_llama
@pytest.mark.parametrize("arch", ["llama-gqa", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_logits_equal_torch(arch, case, tok, tmp_path):
    model = pruned(arch, case, tok)
    path = export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "m.gguf").path
    ids = [1] + tok("the lazy fox jumps over the brown dog")["input_ids"] + [5, 77, 120, 250, 3, 9]
    got, want = llama_logits(path, ids), torch_logits(model, ids)
    assert got.shape == want.shape and np.abs(want).max() > 0.05
    assert np.abs(got - want).max() < BOUND


@needs_llama
def test_llama_cpp_tokenizes_like_hf_and_f16_q8_0_stay_close(tok, tmp_path):
    model = pruned("llama-gqa", "uneven", tok)
    loaded = LoadedModel(model, tok, "tiny")
    text = "the quick brown fox, pruned"
    ids = tok(text)["input_ids"]
    want = torch_logits(model, ids)
    for kind, bound in (("f16", 2e-3), ("q8_0", 5e-2)):  # measured 5e-4 and 1.3e-2 (logits span +-0.9)
        result = export_gguf(loaded, tmp_path / f"m-{kind}.gguf", quantize=kind)
        path = result.path
        # 48 channels rounded up to 64 with zero channels: ffn_down is quantised (not left f16), and aligned for
        # llama.cpp's prompt matmul (f32 keeps 48: the tests above)
        assert [(x.ff, x.zero_channels) for x in result.layers] == [(64, 16)] * 3
        llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        llm.close()
        assert np.abs(llama_logits(path, ids) - want).max() < bound
    assert sorted(os.listdir(tmp_path)) == ["m-f16.gguf", "m-q8_0.gguf"]  # no temporary file left beside them


MLP1 = Selection(tuple(GroupRef(1, C, c) for c in range(48)))  # layer 1 keeps its attention, loses its MLP


@needs_llama
def test_mlp_free_layer_needs_its_stub_channel(tok, tmp_path, monkeypatch):
    """Why the zero MLP channel: written as feed_forward_length 0, deci drops the layer's attention output (middle
    layer: wrong logits) or aborts (last layer: GGML_ASSERT in llama_decode; so it runs in a subprocess here)."""
    import subprocess
    import sys

    model = tiny_model("llama-gqa", vocab_size=len(tok))
    shrink_(model, analyse(model), MLP1)
    ids = [5, 9, 13, 22, 7, 40]
    want = torch_logits(model, ids)
    stubbed = export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "stub.gguf")
    assert stubbed.layers[1].stub_mlp and stubbed.layers[1].ff == 1
    assert np.abs(llama_logits(stubbed.path, ids) - want).max() < BOUND
    real = gguf_export.tensors

    def no_stub(m, pad_ff=1):
        glob, blocks, layers, freqs = real(m, pad_ff)
        blocks[1] = {k: v for k, v in blocks[1].items() if not k.startswith("ffn_")}
        layers[1] = gguf_export.GgufLayer(layers[1].heads, layers[1].kv_heads, 0)
        return glob, blocks, layers, freqs

    monkeypatch.setattr(gguf_export, "tensors", no_stub)
    bare = export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "bare.gguf").path
    script = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from test_gguf import llama_logits; "
              "np.save(sys.argv[3], llama_logits(sys.argv[2], [5, 9, 13, 22, 7, 40]))")
    subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(bare), str(tmp_path / "bare.npy")],
                   check=True, capture_output=True, timeout=300)
    assert np.abs(np.load(tmp_path / "bare.npy") - want).max() > 100 * BOUND


@needs_llama
def test_layer0_without_heads_needs_its_stub_head(tok, tmp_path, monkeypatch):
    """Why layer 0 keeps one zero head: llama.cpp reads the head size only when layer 0 has heads; written as
    head_count 0 there, the file does not load."""
    model = pruned("llama-gqa", "emptied-attn0", tok)
    real = gguf_export.tensors

    def no_stub(m, pad_ff=1):
        glob, blocks, layers, freqs = real(m, pad_ff)
        blocks[0] = {k: v for k, v in blocks[0].items() if not k.startswith("attn_")}
        layers[0] = gguf_export.GgufLayer(0, 0, layers[0].ff)
        return glob, blocks, layers, freqs

    monkeypatch.setattr(gguf_export, "tensors", no_stub)
    bare = export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "bare.gguf").path
    with pytest.raises(ValueError, match="Failed to load model"):
        llama_cpp.Llama(str(bare), n_ctx=64, verbose=False)


def test_refuses_other_families_before_writing(tok, tmp_path, tiny_folder):
    for arch, lacks in (("gemma2", "soft-capping"), ("qwen3", "q/k RMS norms"), ("phi3", "sliding-window")):
        model = tiny_model(arch)
        with pytest.raises(GispError, match=f"model type '{arch}' is not covered.*lacks .*{lacks}"):
            export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "x.gguf")
    with pytest.raises(GispError, match="model type 'gemma2' is not covered"):  # from a folder: before loading it
        export_gguf(tiny_folder("gemma2"), tmp_path / "x.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["gemma2"]


def test_bad_input_leaves_nothing(tok, tmp_path, monkeypatch):
    from conftest import tiny_tokenizer

    model = pruned("llama-gqa", "uneven", tok)
    with pytest.raises(GispError, match="--quantize: expected one of f32, f16, q8_0, q4_k_m, got 'int4'"):
        export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "x.gguf", quantize="int4")
    with pytest.raises(GispError, match="expected a file name ending in .gguf"):
        export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "x.bin")
    with pytest.raises(GispError, match="folder .* does not exist"):
        export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "no" / "x.gguf")
    with pytest.raises(GispError, match="only byte-level BPE.*model WordLevel"):  # llama.cpp would tokenise it wrong
        export_gguf(LoadedModel(tiny_model("llama-gqa"), tiny_tokenizer(), "tiny"), tmp_path / "x.gguf")
    with pytest.raises(GispError, match="no tokenizer"):
        export_gguf(LoadedModel(model, None, "tiny"), tmp_path / "x.gguf")

    def fail(src, dst, kind, threads=0):  # the quantiser dies half-way through its output
        dst.write_bytes(b"GGUF partial")
        raise GispError("quantiser failed")

    monkeypatch.setattr(gguf_export, "quantize_file", fail)
    with pytest.raises(GispError, match="quantiser failed"):
        export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "x.gguf", quantize="q8_0")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "x.gguf").write_bytes(b"old")
    with pytest.raises(GispError, match="exists; pass --overwrite"):
        export_gguf(LoadedModel(model, tok, "tiny"), tmp_path / "x.gguf")
    assert (tmp_path / "x.gguf").read_bytes() == b"old"


def test_cli_export_gguf(tok, tmp_path, capsys):
    from gisp_fx.cli import main

    from gisp_fx.save import save_pruned

    folder = tmp_path / "tiny"
    save_pruned(pruned("llama-gqa", "emptied", tok), tok, folder)
    assert main(["export", str(folder), "--format", "gguf", "--output", str(tmp_path / "t.gguf")]) == 0
    out = capsys.readouterr().out
    assert "t.gguf" in out and "heads per layer 1,0,4" in out and "tokenizer hf:bpe" in out
    assert main(["export", str(folder), "--format", "gguf", "--quantize", "int4", "--output",
                 str(tmp_path / "u.gguf")]) == 2
    assert "--quantize int4 is an ONNX option" in capsys.readouterr().err
    assert main(["export", str(folder), "--quantize", "q8_0", "--output", str(tmp_path / "o")]) == 2
    assert "--quantize q8_0 needs --format gguf" in capsys.readouterr().err


def test_tokenizer_copied_from_source_gguf():
    from gisp_fx.exporters.gguf_vocab import from_gguf
    from gisp_fx.loading import bundled_gguf

    path = bundled_gguf("smollm2")
    vocab = from_gguf(path, 49160)  # an embedding with 8 rows more than the tokens: unused tokens fill them
    fields = {f[0]: f[1] for f in vocab.fields}
    assert vocab.origin == f"gguf:{path}" and fields["tokenizer.ggml.pre"] == b"smollm"
    assert fields["tokenizer.ggml.model"] == b"gpt2" and fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.ggml.tokens"][1] == b"<|im_start|>" and len(fields["tokenizer.ggml.merges"]) == 48900
    assert len(fields["tokenizer.ggml.tokens"]) == 49160 and fields["tokenizer.ggml.tokens"][-1] == b"[PAD49159]"
    assert fields["tokenizer.ggml.token_type"][-1] == 5 and "tokenizer.chat_template" in fields


@pytest.mark.slow
@needs_llama
def test_smollm2_gguf_greedy_equals_torch_dense_and_pruned(tmp_path):
    """The bundled SmolLM2, dense and pruned in place (uneven groups, layer 0's attention and layer 5's MLP gone,
    every layer narrower): the f32 GGUF's 32 greedy tokens equal torch's; tokenizer copied from the bundled GGUF."""
    from gisp_fx.loading import bundled_gguf, load_model

    loaded = load_model("smollm2")
    tok = loaded.tokenizer
    model = loaded.model
    texts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived"]
    prompts = [tok(t, return_tensors="pt").input_ids for t in texts]

    def greedy_torch():
        with torch.no_grad():
            return [model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
                    [0, ids.shape[1]:].tolist() for ids in prompts]

    dense = export_gguf(loaded, tmp_path / "dense.gguf")
    assert dense.tokenizer == f"gguf:{bundled_gguf('smollm2')}"
    runs = [(dense.path, greedy_torch())]
    refs = [GroupRef(0, H, h) for h in range(9)] + [GroupRef(5, C, c) for c in range(1536)]
    refs += [GroupRef(i, H, h) for i in range(1, 30) for h in (1, 5, 8)]  # K/V groups of 3 heads keep 2, 2, 2
    refs += [GroupRef(i, H, 4) for i in range(1, 30, 2)]  # ... and 2, 1, 2 in odd layers: uneven
    refs += [GroupRef(i, C, c) for i in range(30) if i != 5 for c in range(0, 1536, 3)]
    shrink_(model, analyse(model), Selection(tuple(refs)))
    small = export_gguf(LoadedModel(model, tok, "smollm2"), tmp_path / "pruned.gguf")
    assert small.layers[0].stub_attention and small.layers[5].stub_mlp
    assert small.layers[1].zero_query_heads == 1 and small.layers[2].zero_query_heads == 0
    runs.append((small.path, greedy_torch()))
    for path, wants in runs:
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, type_k=0, type_v=0, verbose=False)
        for text, ids, want in zip(texts, prompts, wants):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids[0].tolist()  # the copied vocab
            got = []
            for token in llm.generate(ids[0].tolist(), top_k=1, temp=0.0, reset=True):
                got.append(int(token))
                if len(got) == len(want):
                    break
            assert got == want, path.name
        llm.close()
