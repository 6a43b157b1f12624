"""Pruned folders saved under one transformers line (5.x, 4.57) load under the other with the same logits.

The fixtures were written by `tests/make_fixture.py` under each line; CI runs this file in both environments.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_fx.loading import load_model

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("pruned-*"))


def test_both_lines_have_a_fixture():
    assert {f.name for f in FIXTURES} == {"pruned-tf5", "pruned-tf457"}


@pytest.mark.parametrize("folder", FIXTURES, ids=[f.name for f in FIXTURES])
def test_pruned_folder_loads_across_lines(folder, tmp_path):
    local = tmp_path / folder.name  # trust_remote_code caches the module by folder; copy so runs stay independent
    shutil.copytree(folder, local)
    expected = json.loads((local / "expected.json").read_text())
    ids = torch.tensor(expected["ids"])
    for model in (AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True).eval(),
                  load_model(str(local)).model):
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert torch.allclose(logits, torch.tensor(expected["logits"]), atol=1e-5)
        assert model.model.layers[1].self_attn.__class__.__name__ == "EmptyBlock"
