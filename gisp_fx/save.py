"""A pruned in-memory model -> a Hugging Face folder that `from_pretrained(..., trust_remote_code=True)` loads."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

from gisp_fx import modeling_gisp
from gisp_fx.outputs import probe_writable

AUTO_MAP = {"AutoModelForCausalLM": "modeling_gisp.GispForCausalLM"}


def modeling_source(base: str) -> str:
    """modeling_gisp.py as shipped, plus the class that mixes it into the model's own architecture."""
    return inspect.getsource(modeling_gisp) + f'''

from transformers import {base} as _Base  # noqa: E402


class GispForCausalLM(GispMixin, _Base):
    """{base} with the pruned shapes recorded in config.gisp."""
'''


def save_pruned(model, tokenizer, folder: Path) -> None:
    """safetensors weights + config.json (with `gisp` and `auto_map`) + tokenizer + modeling_gisp.py.

    A model nothing was removed from (a trajectory's step 0) is saved as the plain model it is: no auto_map, no
    modeling file, so it loads anywhere without trust_remote_code.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = base_class(model)
    if not getattr(model.config, "gisp", None):
        for key in ("auto_map", "gisp"):
            if hasattr(model.config, key):
                delattr(model.config, key)
        model.config.architectures = [base]
        model.save_pretrained(folder, safe_serialization=True)
        save_tokenizer(tokenizer, folder)
        return
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = ["GispForCausalLM"]
    model.config.gisp["runtime_version"] = modeling_gisp.RUNTIME_VERSION
    model.config.gisp["base_class"] = base
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    (folder / "modeling_gisp.py").write_text(modeling_source(base))


def save_tokenizer(tokenizer, folder: Path) -> None:
    """save_pretrained, readable by both transformers lines: 5.x names a plain fast tokenizer 'TokenizersBackend',
    a class 4.57 does not have; 'PreTrainedTokenizerFast' means the same to both."""
    tokenizer.save_pretrained(folder)
    file = Path(folder) / "tokenizer_config.json"
    if file.is_file():
        cfg = json.loads(file.read_text())
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            file.write_text(json.dumps(cfg, indent=2))


def saved_runtime_version(folder: Path) -> int:
    """The runtime version of a saved folder's modeling_gisp.py (1 for the unstamped copies of gisp-fx 0.1)."""
    import re

    file = Path(folder) / "modeling_gisp.py"
    found = re.search(r"^RUNTIME_VERSION = (\d+)$", file.read_text(), re.M) if file.is_file() else None
    return int(found.group(1)) if found else 1


def base_class(model) -> str:
    """The transformers class the pruned model is an instance of (its GispForCausalLM base, once reloaded)."""
    for cls in type(model).__mro__:  # *ForCausalLM, or an older name for the same head (GPT2LMHeadModel)
        if cls.__module__.startswith("transformers.models.") and cls.__name__.endswith(("ForCausalLM", "LMHeadModel")):
            return cls.__name__
    raise TypeError(f"{type(model).__name__} is not a transformers causal-LM class (*ForCausalLM, *LMHeadModel)")


@contextlib.contextmanager
def staged_dir(out: Path):
    """A private temp folder beside `out`, renamed onto it when the block succeeds and removed when it fails."""
    out = Path(out)
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published folder should not be
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def check_output_folder(out: str | os.PathLike, flag: str = "--output") -> Path:
    """Refuse an output path that cannot become a folder: an existing file, a path under one, or a place that
    cannot be written (a read-only file system, /proc, a full disk: probed with an empty folder)."""
    from gisp_fx.errors import GispError

    out = Path(out)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"lies under '{path}', which is a file"
            raise GispError(f"{flag} '{out}' {where}; gisp-fx writes a folder there: choose a folder path")
    probe_writable(out.absolute())
    return out
