"""CompileConfig: every knob of `gisp-fx compile`, a small frozen dataclass that round-trips through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from gisp_fx.errors import GispError

CONFIG_VERSION = 1
OBJECTIVES = ("ppl", "margin")
NORMALIZE = ("reference", "params", "none")
METHODS = ("gisp", "oneshot", "wanda-sp", "magnitude", "taylor-local", "random")
GRADIENT_METHODS = ("gisp", "oneshot", "taylor-local")
DTYPES = ("float32", "bfloat16", "float16")
UNIFORM_METHODS = ("wanda-sp", "taylor-local")  # the same ratio in every layer; the others rank globally


@dataclass(frozen=True)
class CompileConfig:
    model: str
    sparsity: float
    output: str
    method: str = "gisp"
    objective: str = "ppl"
    tasks: tuple[str, ...] = ()
    calib: str | None = None  # plain-text calibration file (ppl objective); default: bundled WikiText-2 train
    calib_samples: int = 64
    seq_len: int = 128
    batch_size: int = 8
    steps: int = 8
    oneshot: bool = False
    normalize: str = "reference"
    protect: str | None = None  # None: reference default; "none"; or "0,1,29"
    seed: int = 0
    eval_windows: int | None = 256  # WikiText-2 test windows for the report; None = all 2,382 (about 10 min each)
    version: int = CONFIG_VERSION
    checkpoint: bool = False  # activation checkpointing of the decoder layers while scoring (less memory)
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # the weights' dtype: float32 | bfloat16 | float16 (gradients summed in fp32)

    def validate(self) -> "CompileConfig":
        if not 0 < self.sparsity <= 0.95:
            raise GispError(f"--sparsity must be in (0, 0.95], got {self.sparsity}")
        if self.method not in METHODS:
            raise GispError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.objective == "margin" and self.method not in GRADIENT_METHODS:
            raise GispError(f"--objective margin needs a gradient method ({', '.join(GRADIENT_METHODS)}); "
                            f"'{self.method}' does not use gradients")
        if self.objective not in OBJECTIVES:
            raise GispError(f"--objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'")
        if self.objective == "margin" and not self.tasks:
            raise GispError("--objective margin needs --tasks (e.g. arc_easy,arc_challenge,openbookqa,winogrande)")
        if self.normalize not in NORMALIZE:
            raise GispError(f"--normalize must be one of {', '.join(NORMALIZE)}, got '{self.normalize}'")
        for name in ("calib_samples", "seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise GispError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise GispError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        if self.dtype not in DTYPES:
            raise GispError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise GispError(f"--eval-windows must be positive or 'all', got {self.eval_windows}")
        return self

    @property
    def effective_method(self) -> str:
        return "oneshot" if self.oneshot and self.method == "gisp" else self.method

    @property
    def schedule_steps(self) -> int:
        """GISP iterates; every other method (one-shot GISP and the baselines) prunes in one step."""
        return self.steps if self.effective_method == "gisp" else 1

    def to_json(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @staticmethod
    def from_json(d: dict) -> "CompileConfig":
        known = {f.name for f in fields(CompileConfig)}
        d = {k: v for k, v in d.items() if k in known}
        d["tasks"] = tuple(d.get("tasks", ()))
        return CompileConfig(**d)

    def same_run(self, other: "CompileConfig") -> list[str]:
        """The settings that differ and would change the trajectory (output/eval settings do not)."""
        ignore = {"output", "eval_windows", "checkpoint"}  # checkpointing recomputes the same numbers
        return [f.name for f in fields(self) if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]
