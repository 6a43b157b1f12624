"""Shared test fixtures: tiny seeded HF models built in-process, and a tiny tokenizer, all offline."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (`make test` runs one worker per core) each worker gets an equal share of the cores, it and the
# processes it starts: tiny models gain nothing from intra-op threads, and oversubscribed cores slow every worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)

# name -> (config class, model class, overrides)
ARCHS = {
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}

# Families whose configs do not follow Llama's field names: complete kwargs each (hidden 64, 4 heads of 16, 48 MLP
# channels, 3 layers, as above), with their own expectations in tests/test_families.py.
IDS = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "opt": ("OPTConfig", "OPTForCausalLM", dict(IDS, hidden_size=64, ffn_dim=48, num_hidden_layers=3,
                                                num_attention_heads=4, max_position_embeddings=256,
                                                word_embed_proj_dim=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(IDS, n_embd=64, n_inner=48, n_layer=3, n_head=4, n_positions=256)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(IDS, hidden_size=64, ffn_hidden_size=48, num_hidden_layers=3,
                                                         num_attention_heads=4)),  # multi-query, parallel attention
    "falcon-mha": ("FalconConfig", "FalconForCausalLM", dict(IDS, hidden_size=64, ffn_hidden_size=48,
                                                             num_hidden_layers=3, num_attention_heads=4,
                                                             multi_query=False, parallel_attn=False, bias=True)),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(IDS, hidden_size=64, intermediate_size=48,
                                                             num_hidden_layers=3, num_attention_heads=4,
                                                             max_position_embeddings=256, rotary_pct=0.5)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(BASE)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(BASE)),  # q/k norms span all heads: MLP channels only
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg_name, model_name, extra = ARCHS[arch] if arch in ARCHS else FAMILIES[arch]
    kwargs = {**(BASE if arch in ARCHS else {}), **extra, **overrides}
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb every parameter so that no structure hides.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_tokenizer(adds_bos: bool = False):
    """A word-level fast tokenizer over the tiny vocabulary (no files, no hub); `adds_bos`: it puts <s> before every
    encoded text, as Llama-2/3, Mistral and Gemma tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, BASE["vocab_size"]):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture
def tiny_folder(tmp_path):
    """Save a tiny model with its tokenizer to a folder; returns a function arch -> path."""

    def make(arch: str = "llama-gqa", **overrides) -> str:
        path = tmp_path / arch
        tiny_model(arch, **overrides).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        return str(path)

    return make


def tokens(batch: int = 2, seq: int = 12, vocab: int = BASE["vocab_size"], seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
