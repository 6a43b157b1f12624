"""Write tests/fixtures/pruned-<line>: a tiny pruned folder saved under this environment's transformers line,
with the logits it gives on a fixed batch. `tests/test_cross_line.py` loads every fixture under every line.

    .venv/bin/python tests/make_fixture.py          # transformers 5.x -> tests/fixtures/pruned-tf5
    .venv-tf457/bin/python tests/make_fixture.py    # transformers 4.57 -> tests/fixtures/pruned-tf457
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model, tiny_tokenizer, tokens  # noqa: E402
from gisp_fx.passes.shrink import shrink_  # noqa: E402
from gisp_fx.passes.analyse import analyse  # noqa: E402
from gisp_fx.save import save_pruned  # noqa: E402
from test_rewrite import SELECTION  # noqa: E402


def main() -> None:
    line = "tf5" if transformers.__version__.startswith("5.") else "tf457"
    out = Path(__file__).parent / "fixtures" / f"pruned-{line}"
    model = tiny_model("llama-gqa", intermediate_size=16)
    shrink_(model, analyse(model), SELECTION.__class__(tuple(r for r in SELECTION.removed if r.index < 16)))
    save_pruned(model, tiny_tokenizer(), out)
    ids = tokens(2, 6, seed=11)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    (out / "expected.json").write_text(json.dumps({"transformers": transformers.__version__, "ids": ids.tolist(),
                                                   "logits": logits.tolist()}))
    print(out)


if __name__ == "__main__":
    main()
