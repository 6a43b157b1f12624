"""The settings of a run as small frozen dataclasses that round-trip through JSON: GispConfig (what `prune_` needs)
and CompileConfig (every knob of `gisp-fx compile`: the pruning settings plus model, data, output and evaluation).
The enums here are the CLI's choices."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields

from gisp_fx.datasets import BOS_MODES
from gisp_fx.errors import GispError
from gisp_fx.passes.pg import PgConfig
from gisp_fx.passes.repair import AT as REPAIR_AT, BLOCK_SAMPLES, MODES as REPAIR_MODES, RepairSettings
from gisp_fx.passes.repair_check import fit_windows
from gisp_fx.passes.select import Normalize
from gisp_fx.plan import GroupPlan

CONFIG_VERSION = 1


class Method(str, enum.Enum):
    """A pruning method; its value is the CLI's and the trajectory's spelling."""

    GISP = "gisp"  # iterative, global ranking of loss-gradient scores
    ONESHOT = "oneshot"  # GISP in one step
    WANDA_SP = "wanda-sp"  # |W| * ||X||, the same ratio in every layer
    MAGNITUDE = "magnitude"
    TAYLOR_LOCAL = "taylor-local"  # GISP's scores, the same ratio in every layer
    RANDOM = "random"
    PG = "pg"  # policy-gradient pruning, forward passes only

    @property
    def gradient(self) -> bool:
        return self in (Method.GISP, Method.ONESHOT, Method.TAYLOR_LOCAL)

    @property
    def uniform(self) -> bool:
        """The same ratio cut from every layer; the others rank all layers together."""
        return self in (Method.WANDA_SP, Method.TAYLOR_LOCAL)

    @property
    def calibration_free(self) -> bool:
        return self in (Method.MAGNITUDE, Method.RANDOM)

    @property
    def normalizing(self) -> bool:
        """The methods whose global ranking --normalize changes."""
        return self in (Method.GISP, Method.ONESHOT)


class Objective(str, enum.Enum):
    PPL = "ppl"
    MARGIN = "margin"


class Checkpoint(str, enum.Enum):
    """Activation checkpointing of the decoder layers while scoring: auto (when the estimated memory of the scoring
    pass exceeds the budget), on, or off."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


METHODS = tuple(m.value for m in Method)
OBJECTIVES = tuple(o.value for o in Objective)
NORMALIZE = tuple(n.value for n in Normalize)
CHECKPOINT = tuple(c.value for c in Checkpoint)
GRADIENT_METHODS = tuple(m.value for m in Method if m.gradient)
DTYPES = ("float32", "bfloat16", "float16")
UNIFORM_METHODS = tuple(m.value for m in Method if m.uniform)
CALIBRATION_FREE = tuple(m.value for m in Method if m.calibration_free)
NORMALIZING_METHODS = tuple(m.value for m in Method if m.normalizing)


def _choice(flag: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GispError(f"{flag} must be one of {', '.join(allowed)}, got '{value}'")


@dataclass(frozen=True)
class GispConfig:
    """What `prune_` needs: the method, the target and the schedule, the repair, and how to score."""

    sparsity: float
    method: str = Method.GISP.value
    steps: int = 8
    oneshot: bool = False
    normalize: str = Normalize.REFERENCE.value
    protect: str | None = None  # None: the reference default (first 10 % and last); "none"; or "0,1,29"
    seed: int = 0
    repair: str = "none"  # none | bias | lsq | block (passes/repair.py)
    repair_at: str = "end"
    pg: PgConfig = field(default_factory=PgConfig)  # --method pg; its seed is this config's
    checkpoint: str = Checkpoint.AUTO.value
    memory_budget_gb: float | None = None  # checkpoint auto: the budget (default: half the free memory)
    shard: bool = False
    # gisp/oneshot: each head's and channel's score weighted by the share of its output an lsq repair could not rebuild
    repair_aware: bool = False

    def validate(self) -> "GispConfig":
        if not isinstance(self.sparsity, (int, float)) or isinstance(self.sparsity, bool):
            raise GispError(f"sparsity must be a number in (0, 0.95], got {type(self.sparsity).__name__} "
                            f"{self.sparsity!r}")
        if not 0 < self.sparsity <= 0.95:
            raise GispError(f"--sparsity must be in (0, 0.95], got {self.sparsity}")
        _choice("--method", self.method, METHODS)
        _choice("--normalize", self.normalize, NORMALIZE)
        _choice("--checkpoint", self.checkpoint, CHECKPOINT)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise GispError(f"--steps must be at least 1, got {self.steps!r}")
        if self.repair not in REPAIR_MODES or self.repair_at not in REPAIR_AT:
            raise GispError(f"--repair must be one of {', '.join(REPAIR_MODES)} and --repair-at one of "
                            f"{', '.join(REPAIR_AT)}, got '{self.repair}' and '{self.repair_at}'")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise GispError(f"--memory-budget must be a positive number of GB, got {self.memory_budget_gb}")
        if self.protect is not None and (not isinstance(self.protect, str) or not self.protect.strip(" ,")):
            raise GispError(f"--protect: got '{self.protect}', an empty list; give 'none' to protect no layer, "
                            "comma-separated layer indices, or leave the flag out for the default")
        if self.effective_method is Method.PG:
            self.pg_config().validate()
        if self.repair_aware and self.effective_method not in (Method.GISP, Method.ONESHOT):
            raise GispError(f"--repair-aware weights the global ranking of gisp and oneshot; --method "
                            f"{self.effective_method.value} does not rank globally: use --method gisp or oneshot")
        if self.repair != "none" and self.effective_method.calibration_free:
            raise GispError(f"--repair {self.repair} re-fits weights on language-model calibration windows; "
                            f"--method {self.method} uses none: use a calibrated method, or --repair none")
        return self

    @property
    def effective_method(self) -> Method:
        return Method.ONESHOT if self.oneshot and self.method == Method.GISP else Method(self.method)

    @property
    def schedule_steps(self) -> int:
        """GISP iterates; every other method (one-shot GISP and the baselines) prunes in one step."""
        return self.steps if self.effective_method is Method.GISP else 1

    def pg_config(self) -> PgConfig:
        return PgConfig(**{**asdict(self.pg), "seed": self.seed})

    def repair_settings(self) -> RepairSettings:
        return RepairSettings(self.repair, self.repair_at if self.schedule_steps > 1 else "end")

    def to_json(self) -> dict:
        return {**asdict(self), "pg": asdict(self.pg)}


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
    checkpoint: str = Checkpoint.AUTO.value  # activation checkpointing while scoring: auto | on | off
    memory_budget_gb: float | None = None  # --checkpoint auto: the scoring pass's budget (default: half the free memory)
    device: str = "cpu"  # cpu | cuda | cuda:N
    dtype: str = "float32"  # the weights' dtype: float32 | bfloat16 | float16 (gradients summed in fp32)
    # repair of the consumer linears (passes/repair.py): none | bias | lsq, after every step or once at the end
    repair: str = "none"
    repair_at: str = "end"
    # windows of the repair's own calibration, drawn from the same text (default: --calib-samples; block: 256)
    repair_samples: int | None = None
    shard: bool = False  # score on an FSDP2 copy whose decoder layers are sharded across the torchrun processes
    repair_aware: bool = False  # gisp/oneshot: scores weighted by what an lsq repair could not rebuild (passes/repair_aware.py)

    def validate(self, given: frozenset[str] | None = None) -> "CompileConfig":
        """Check every setting; `given` names the settings the user set (default: those that differ from their
        defaults), each of which must apply to the method and objective: none is silently ignored."""
        self.gisp().validate()
        if self.objective == "margin" and self.method not in GRADIENT_METHODS:
            raise GispError(f"--objective margin needs a gradient method ({', '.join(GRADIENT_METHODS)}); "
                            f"'{self.method}' does not use gradients")
        _choice("--objective", self.objective, OBJECTIVES)
        if self.objective == "margin" and not self.tasks:
            raise GispError("--objective margin needs --tasks (e.g. arc_easy,arc_challenge,openbookqa,winogrande)")
        for name in ("calib_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise GispError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise GispError(f"--seq-len must be at least 2 tokens, got {self.seq_len}")
        _choice("--bos", self.bos, BOS_MODES)
        _choice("--dtype", self.dtype, DTYPES)
        if self.repair != "none" and self.objective == "margin":
            raise GispError(f"--repair {self.repair} re-fits weights on language-model calibration windows; "
                            "--objective margin calibrates on multiple-choice questions: use --objective ppl, or "
                            "--repair none")
        if self.repair_samples is not None and self.repair_samples < 1:
            raise GispError(f"--repair-samples must be at least 1, got {self.repair_samples}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise GispError(f"--eval-windows must be positive or 'all', got {self.eval_windows}")
        ignored = self.ignored(self.non_default() if given is None else given)
        if ignored:
            raise GispError("settings that would be ignored: " + "; ".join(ignored) + ". Leave them out")
        return self

    @property
    def repair_windows(self) -> int:
        """The windows the repair fits on: --repair-samples, else block's BLOCK_SAMPLES (trained sublayers overfit
        64 windows: benchmarks/results/repair.md), else the calibration's own --calib-samples."""
        if self.repair_samples is not None:
            return self.repair_samples
        return max(BLOCK_SAMPLES, self.calib_samples) if self.repair == "block" else self.calib_samples

    def repair_windows_for(self, plan: GroupPlan) -> int:
        """The windows the repair fits on for `plan`'s model: --repair-samples as given; else repair_windows, raised
        for the fitting repairs (lsq, block) to THIN_FIT tokens per input feature of the widest consumer linear
        (fit_windows: on Qwen2.5-Coder-1.5B lsq on 64 windows overfit where 256 gained, docs/results.md)."""
        if self.repair_samples is not None or not self.repair_settings().fits:
            return self.repair_windows
        return max(self.repair_windows, fit_windows(plan, self.seq_len))

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
            out.append("--repair-at applies to --repair bias|lsq|block with iterative gisp; "
                       + ("--repair is none" if self.repair == "none" else f"--method {method} prunes in one step"))
        if "repair_aware" in given and self.objective != "ppl":
            out.append(f"--repair-aware fits on language-model windows; --objective {self.objective} calibrates on "
                       "multiple-choice questions")
        if "repair_samples" in given and self.repair == "none":
            out.append("--repair-samples sets the repair's calibration; --repair is none")
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

    @staticmethod
    def from_gisp(config: GispConfig, model: str = "", output: str = "") -> "CompileConfig":
        """The compile settings that prune as `config` does (how a trajectory of `prune_` records its settings)."""
        pg = config.pg
        return CompileConfig(model, config.sparsity, output, config.method, steps=config.steps,
                             oneshot=config.oneshot, normalize=config.normalize, protect=config.protect,
                             seed=config.seed, pg_iters=pg.iters, pg_samples=pg.samples, pg_lr=pg.lr,
                             pg_init=pg.init, pg_groups=pg.granularity, pg_budget=pg.budget, pg_penalty=pg.penalty,
                             checkpoint=config.checkpoint, memory_budget_gb=config.memory_budget_gb,
                             repair=config.repair, repair_at=config.repair_at, shard=config.shard,
                             repair_aware=config.repair_aware)

    def gisp(self) -> GispConfig:
        """The pruning settings of this compile."""
        pg = PgConfig(iters=self.pg_iters, samples=self.pg_samples, lr=self.pg_lr, init=self.pg_init,
                      granularity=self.pg_groups, budget=self.pg_budget, penalty=self.pg_penalty, seed=self.seed)
        return GispConfig(self.sparsity, self.method, self.steps, self.oneshot, self.normalize, self.protect,
                          self.seed, self.repair, self.repair_at, pg, self.checkpoint, self.memory_budget_gb,
                          self.shard, self.repair_aware)

    @property
    def effective_method(self) -> str:
        return self.gisp().effective_method.value

    @property
    def schedule_steps(self) -> int:
        return self.gisp().schedule_steps

    def pg_config(self) -> PgConfig:
        return self.gisp().pg_config()

    def repair_settings(self) -> RepairSettings:
        return self.gisp().repair_settings()

    def to_json(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @staticmethod
    def from_json(d: dict) -> "CompileConfig":
        known = {f.name for f in fields(CompileConfig)}
        d = {k: v for k, v in d.items() if k in known}
        if isinstance(d.get("checkpoint"), bool):  # runs recorded before --checkpoint auto: on/off
            d["checkpoint"] = Checkpoint.ON.value if d["checkpoint"] else Checkpoint.OFF.value
        d["tasks"] = tuple(d.get("tasks", ()))
        return CompileConfig(**d)

    def same_run(self, other: "CompileConfig") -> list[str]:
        """The settings that differ and would change the trajectory (output/eval settings do not)."""
        ignore = {"output", "eval_windows", "checkpoint", "memory_budget_gb", "shard"}  # the same sums, recomputed or sharded
        return [f.name for f in fields(self) if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)]
