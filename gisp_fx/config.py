"""CompileConfig: every knob of `gisp-fx compile`, a small frozen dataclass that round-trips through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from gisp_fx.errors import GispError

CONFIG_VERSION = 1
OBJECTIVES = ("ppl", "margin")
NORMALIZE = ("reference", "params", "none")
METHODS = ("gisp", "oneshot", "wanda-sp", "magnitude", "taylor-local", "random", "pg")
GRADIENT_METHODS = ("gisp", "oneshot", "taylor-local")
DTYPES = ("float32", "bfloat16", "float16")
UNIFORM_METHODS = ("wanda-sp", "taylor-local")  # the same ratio in every layer; the others rank globally
CALIBRATION_FREE = ("magnitude", "random")  # score from the weights (or the seed) alone
NORMALIZING_METHODS = ("gisp", "oneshot")  # the methods whose global ranking --normalize changes
REPAIR_MODES = ("none", "bias", "lsq")  # as gisp_fx.passes.repair.MODES / AT (kept here: config stays import-light)
REPAIR_AT = ("step", "end")
BOS_MODES = ("auto", "always", "never")  # as gisp_fx.datasets.BOS_MODES (kept here so config stays import-light)


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
    bos: str = "auto"  # calibration and evaluation windows start with BOS: auto (when the tokenizer adds one) | always | never
    # --method pg (policy gradient, forward only; passes/pg.py)
    pg_iters: int = 100
    pg_samples: int = 2
    pg_lr: float = 0.05
    pg_init: str = "sigmap"
    pg_groups: str = "kv"
    pg_budget: str = "params"
    pg_penalty: float = 0.0
    checkpoint: bool = True  # activation checkpointing of the decoder layers while scoring (--no-checkpoint: off)
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # the weights' dtype: float32 | bfloat16 | float16 (gradients summed in fp32)
    # repair of the consumer linears (passes/repair.py): none | bias | lsq, after every step or once at the end
    repair: str = "none"
    repair_at: str = "end"
    shard: bool = False  # score on an FSDP2 copy whose decoder layers are sharded across the torchrun processes

    def validate(self, given: frozenset[str] | None = None) -> "CompileConfig":
        """Check every setting; `given` names the settings the user set (default: those that differ from their
        defaults), each of which must apply to the method and objective: none is silently ignored."""
        if not 0 < self.sparsity <= 0.95:
            raise GispError(f"--sparsity must be in (0, 0.95], got {self.sparsity}")
        if self.method not in METHODS:
            raise GispError(f"--method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.objective == "margin" and self.method not in GRADIENT_METHODS:
            raise GispError(f"--objective margin needs a gradient method ({', '.join(GRADIENT_METHODS)}); "
                            f"'{self.method}' does not use gradients")
        if self.method == "pg":
            self.pg_config().validate()
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
        if self.protect is not None and not self.protect.strip(" ,"):
            raise GispError(f"--protect: got '{self.protect}', an empty list; give 'none' to protect no layer, "
                            "comma-separated layer indices, or leave the flag out for the default")
        if self.bos not in BOS_MODES:
            raise GispError(f"--bos must be one of {', '.join(BOS_MODES)}, got '{self.bos}'")
        if self.dtype not in DTYPES:
            raise GispError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if self.repair not in REPAIR_MODES or self.repair_at not in REPAIR_AT:
            raise GispError(f"--repair must be one of {', '.join(REPAIR_MODES)} and --repair-at one of "
                            f"{', '.join(REPAIR_AT)}, got '{self.repair}' and '{self.repair_at}'")
        if self.repair != "none" and (self.method in CALIBRATION_FREE or self.objective == "margin"):
            why = f"--method {self.method} uses none" if self.method in CALIBRATION_FREE else \
                "--objective margin calibrates on multiple-choice questions"
            raise GispError(f"--repair {self.repair} re-fits weights on language-model calibration windows; {why}: "
                            "use a calibrated method with --objective ppl, or --repair none")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise GispError(f"--eval-windows must be positive or 'all', got {self.eval_windows}")
        ignored = self.ignored(self.non_default() if given is None else given)
        if ignored:
            raise GispError("settings that would be ignored: " + "; ".join(ignored) + ". Leave them out")
        return self

    def non_default(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) != f.default)

    def ignored(self, given: frozenset[str]) -> list[str]:
        """Of the settings in `given`, those this method and objective do not use, each with the reason."""
        method, out = self.effective_method, []
        if "oneshot" in given and self.method not in ("gisp", "oneshot"):
            out.append(f"--oneshot applies to gisp; --method {self.method} has its own schedule")
        if "steps" in given and method != "gisp":
            out.append(f"--steps applies to iterative gisp; --method {method} prunes in one step")
        if "normalize" in given and method not in NORMALIZING_METHODS:
            out.append(f"--normalize applies to {' and '.join(NORMALIZING_METHODS)}; --method {method} does not "
                       "normalise its scores")
        if "tasks" in given and self.objective != "margin":
            out.append(f"--tasks applies to --objective margin; --objective {self.objective} calibrates on text")
        if "calib" in given and self.objective == "margin":
            out.append("--calib applies to --objective ppl; --objective margin calibrates on the --tasks' questions")
        if "repair_at" in given and (self.repair == "none" or self.schedule_steps == 1):
            out.append("--repair-at applies to --repair bias|lsq with iterative gisp; "
                       + ("--repair is none" if self.repair == "none" else f"--method {method} prunes in one step"))
        pg = sorted(name for name in given if name.startswith("pg_"))
        if pg and method != "pg":
            out.append(f"{', '.join('--' + n.replace('_', '-') for n in pg)} apply to --method pg, not {method}")
        if "shard" in given and (method not in GRADIENT_METHODS or self.objective != "ppl"):
            out.append(f"--shard shards the gradients of the ppl objective; --method {method} with --objective "
                       f"{self.objective} takes none to shard")
        if method in CALIBRATION_FREE:
            for name in ("calib", "calib_samples", "seq_len", "batch_size"):
                if name in given:
                    out.append(f"--{name.replace('_', '-')} sets calibration; --method {method} uses none")
        return out

    @property
    def effective_method(self) -> str:
        return "oneshot" if self.oneshot and self.method == "gisp" else self.method

    @property
    def schedule_steps(self) -> int:
        """GISP iterates; every other method (one-shot GISP and the baselines) prunes in one step."""
        return self.steps if self.effective_method == "gisp" else 1

    def pg_config(self):
        from gisp_fx.passes.pg import PgConfig

        return PgConfig(iters=self.pg_iters, samples=self.pg_samples, lr=self.pg_lr, init=self.pg_init,
                        granularity=self.pg_groups, budget=self.pg_budget, penalty=self.pg_penalty, seed=self.seed)

    def repair_settings(self):
        from gisp_fx.passes.repair import RepairSettings

        return RepairSettings(self.repair, self.repair_at if self.schedule_steps > 1 else "end")

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
        ignore = {"output", "eval_windows", "checkpoint", "shard"}  # the same sums, recomputed or sharded
        return [f.name for f in fields(self) if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]
