"""(pruned student, dense teacher, RecoverConfig, token windows) -> the student distilled in place, a RecoverResult.

Logit distillation as the recovery stage of pruning pipelines (Sheared-LLaMA, Minitron, Model Optimizer): AdamW on
the student's remaining weights against KL(teacher || student) through both LM heads in sequence chunks (distill.py),
linear warm-up then cosine decay, gradient clipping, gradient accumulation to a token batch, activation
checkpointing, bf16 autocast over fp32 master weights where asked. No I/O and no evaluation: the caller (the
`recover` command, or a compile right after pruning) loads, checkpoints through `on_step` and `Recovery.state_dict`,
saves and evaluates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum

import torch
from torch import nn

from gisp_fx.errors import GispError
from gisp_fx.passes.distill import check_pair, distill_loss
from gisp_fx.passes.lm_loss import check_head_, checkpointed
from gisp_fx.passes.lora import add_lora_, merge_lora_

RECOVER_CONFIG_VERSION = 1
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}


class Train(str, Enum):
    """What trains. Embeddings and the LM head (tied in most small models, never pruned) stay frozen in every case."""

    NORMS = "norms"  # the norm scales of the decoder layers and the final norm
    LINEARS = "linears"  # the decoder layers' linear weights and biases
    ALL = "all"  # every remaining weight of the decoder: layers and final norm


@dataclass(frozen=True)
class RecoverConfig:
    tokens: int  # training tokens to distil on (whole optimizer steps: rounded up to a multiple of the batch)
    lr: float = 2e-4  # peak learning rate
    batch_tokens: int = 1024  # tokens per optimizer step (gradients accumulated over micro-batches)
    micro_tokens: int = 512  # tokens per forward/backward
    seq_len: int = 128  # the windows' length (checked against the windows given)
    warmup: float = 0.05  # share of the steps with a linear warm-up (at least one step)
    min_lr: float = 0.1  # the cosine decays to min_lr x lr
    weight_decay: float = 0.0
    clip: float = 1.0  # max global gradient norm
    train: Train = Train.ALL
    lora_rank: int = 0  # > 0: the linears train as rank-r adapters, merged into the weights at the end
    lora_alpha: float | None = None  # adapter scale alpha / r; None: 2 r
    ce_weight: float = 0.0  # loss = KL + ce_weight x next-token cross-entropy
    precision: str = "float32"  # autocast dtype: float32 (none) | bfloat16; the master weights stay fp32
    checkpointing: bool = True  # recompute each decoder layer's activations in backward
    seed: int = 0
    version: int = RECOVER_CONFIG_VERSION

    def __post_init__(self):
        object.__setattr__(self, "train", Train(self.train))

    def validate(self) -> None:
        if self.tokens < 1:
            raise GispError(f"recover: --tokens must be at least 1, got {self.tokens}")
        if self.seq_len < 2:
            raise GispError(f"recover: --seq-len must be at least 2 tokens, got {self.seq_len}")
        if self.batch_tokens < self.seq_len:
            raise GispError(f"recover: --batch-tokens ({self.batch_tokens}) must hold at least one window of "
                            f"--seq-len {self.seq_len} tokens")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise GispError(f"recover: --lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr <= 1:
            raise GispError(f"recover: warm-up share must be in [0, 1) and min_lr in [0, 1], got {self.warmup}, "
                            f"{self.min_lr}")
        if self.lora_rank < 0:
            raise GispError(f"recover: --lora-rank must be 0 (full tuning) or positive, got {self.lora_rank}")
        if self.ce_weight < 0:
            raise GispError(f"recover: --ce-weight must be 0 or positive, got {self.ce_weight}")
        if self.precision not in AUTOCAST:
            raise GispError(f"recover: --dtype must be one of {', '.join(AUTOCAST)} (bf16 autocast over fp32 master "
                            f"weights), got '{self.precision}'")

    @property
    def windows_per_step(self) -> int:
        return self.batch_tokens // self.seq_len

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.windows_per_step * self.seq_len))

    def to_json(self) -> dict:
        return {**asdict(self), "train": self.train.value}

    @staticmethod
    def from_json(doc: dict) -> "RecoverConfig":
        if doc.get("version") != RECOVER_CONFIG_VERSION:
            raise GispError(f"recover: settings of version {doc.get('version')!r}, this gisp-fx reads version "
                            f"{RECOVER_CONFIG_VERSION}")
        return RecoverConfig(**doc)


@dataclass(frozen=True)
class RecoverResult:
    steps: int
    tokens: int  # tokens trained on (windows x seq_len)
    wall_s: float  # training time, summed over resumed sessions
    tokens_per_s: float
    losses: tuple[float, ...]  # mean loss of each optimizer step's batch
    trained_params: int  # parameters the optimizer updated (adapters when LoRA)
    lora_merged: int  # linears whose adapters were merged
    shared_bytes: int = 0  # the teacher's embedding/head given up for the student's equal ones (share_embeddings_)


def trainable(model: nn.Module) -> dict[str, list[str]]:
    """The decoder's parameters by kind ("norms", "linears", "other"), by name; embeddings and the head excluded."""
    head = model.get_output_embeddings()
    frozen = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) or m is head for p in m.parameters()}
    kinds: dict[str, list[str]] = {"norms": [], "linears": [], "other": []}
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in frozen]
        if not own:
            continue
        kind = "linears" if isinstance(module, nn.Linear) else "norms" if all(p.ndim == 1 for _, p in own) else "other"
        kinds[kind] += [f"{mod_name}.{n}" if mod_name else n for n, _ in own]
    return kinds


def share_embeddings_(student: nn.Module, teacher: nn.Module, trained: set[int]) -> int:
    """Let the teacher hold the student's input embedding and LM head where they equal its own (same shape, dtype,
    device and values: a decoder-layer pruning never touches them), so one copy is held instead of two; returns the
    bytes this frees. The teacher gives its tensors up, not the student: a student read from safetensors holds
    slices of one mapping that freeing a single tensor does not release (measured), while the teacher's are its
    own. `trained`: the ids of the parameters the optimizer updates, never shared. No value changes; ties are
    kept (a tied teacher's two names get the student's one tensor)."""
    freed: dict[int, int] = {}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        mine, theirs = getattr(student, get)(), getattr(teacher, get)()
        if mine is None or theirs is None:
            continue
        for name, kept in mine._parameters.items():
            given = theirs._parameters.get(name)
            if kept is None or given is None or kept is given or id(kept) in trained:
                continue
            if (kept.shape, kept.dtype, kept.device) == (given.shape, given.dtype, given.device) and \
                    torch.equal(kept, given):
                theirs._parameters[name] = kept
                freed[id(given)] = given.numel() * given.element_size()
    return sum(freed.values())


def _schedule(config: RecoverConfig) -> Callable[[int], float]:
    warm = max(1, round(config.warmup * config.steps))

    def factor(step: int) -> float:  # the lr multiplier of optimizer step `step` (0-based)
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, config.steps - warm)
        return config.min_lr + (1 - config.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Recovery:
    """One distillation run, step by step; its state_dict (trained weights, optimizer, schedule, RNG, step, losses)
    restores it bit-exactly on a student and teacher loaded as the first time."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: RecoverConfig, windows: torch.Tensor):
        config.validate()
        if windows.ndim != 2 or windows.shape[1] != config.seq_len or len(windows) == 0:
            raise GispError(f"recover: the windows are {tuple(windows.shape)}, expected [n >= 1, {config.seq_len}]")
        check_pair(student, teacher)
        for model in (student, teacher):  # a family whose logits are not head(decoder) must not train on a wrong loss
            check_head_(model, windows[:1].to(next(model.parameters()).device))
        self.student, self.teacher, self.config, self.windows = student, teacher, config, windows
        teacher.eval().requires_grad_(False)
        student.eval()  # no dropout: the distillation target and the student's own forward stay deterministic
        kinds = trainable(student)
        names = {Train.NORMS: kinds["norms"], Train.LINEARS: kinds["linears"],
                 Train.ALL: kinds["norms"] + kinds["linears"] + kinds["other"]}[config.train]
        student.requires_grad_(False)
        params = dict(student.named_parameters())
        if config.lora_rank:
            linears = sorted({n.rpartition(".")[0] for n in kinds["linears"]})
            alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * config.lora_rank
            add_lora_(student, linears, config.lora_rank, alpha, config.seed)
            names = [n for n in names if n not in kinds["linears"]]
            params = dict(student.named_parameters())
            names += [n for n in params if n.endswith((".lora_a", ".lora_b"))]
        if not names:
            raise GispError(f"recover: --train {config.train.value} selects no parameters of this model")
        self.names = names
        self.params = [params[n] for n in names]
        self.shared_bytes = share_embeddings_(student, teacher, {id(p) for p in self.params})
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config))
        per_step = config.windows_per_step
        generator = torch.Generator().manual_seed(config.seed)
        needed = config.steps * per_step
        order = [torch.randperm(len(windows), generator=generator) for _ in range(math.ceil(needed / len(windows)))]
        self.order = torch.cat(order)[:needed]  # epochs over the windows, each in a fresh seeded order
        self.step_index = 0
        self.losses: list[float] = []
        self.wall_s = 0.0

    @property
    def done(self) -> bool:
        return self.step_index >= self.config.steps

    @property
    def tokens(self) -> int:
        return self.step_index * self.config.windows_per_step * self.config.seq_len

    def step(self) -> float:
        """One optimizer step over the next batch of windows; returns its mean loss."""
        cfg = self.config
        started = time.perf_counter()
        per_step, micro = cfg.windows_per_step, max(1, cfg.micro_tokens // cfg.seq_len)
        pick = self.order[self.step_index * per_step : (self.step_index + 1) * per_step]
        device = self.params[0].device
        autocast = AUTOCAST[cfg.precision]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for s in range(0, per_step, micro):
            ids = self.windows[pick[s : s + micro]].to(device)
            with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = distill_loss(self.student, self.teacher, ids, cfg.ce_weight)
            (loss * (len(ids) / per_step)).backward()
            total += loss.item() * len(ids) / per_step
        if not math.isfinite(total):
            raise GispError(f"recover: the loss is {total} at step {self.step_index + 1}; lower --lr or use "
                            "--dtype float32")
        torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        self.losses.append(total)
        self.wall_s += time.perf_counter() - started
        return total

    def state_dict(self) -> dict:
        return {"config": self.config.to_json(), "step": self.step_index, "losses": list(self.losses),
                "wall_s": self.wall_s, "params": {n: p.detach().clone() for n, p in zip(self.names, self.params)},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.to_json():
            raise GispError("recover --resume: the checkpoint was written with other settings "
                            f"({state['config']}); resume with the same flags, or start afresh")
        if sorted(state["params"]) != sorted(self.names):
            raise GispError("recover --resume: the checkpoint's trained parameters are not this model's; it belongs "
                            "to another run")
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(state["params"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.step_index, self.losses, self.wall_s = state["step"], list(state["losses"]), state["wall_s"]

    def finish(self) -> RecoverResult:
        """Merge any adapters and freeze the student again; the run's figures."""
        trained = sum(p.numel() for p in self.params)
        merged = merge_lora_(self.student)
        self.student.requires_grad_(False)
        return RecoverResult(self.step_index, self.tokens, self.wall_s, self.tokens / max(self.wall_s, 1e-9),
                             tuple(self.losses), trained, merged, self.shared_bytes)


def recover_(student: nn.Module, teacher: nn.Module, config: RecoverConfig, windows: torch.Tensor, *,
             state: dict | None = None, on_step: Callable[[Recovery], None] | None = None) -> RecoverResult:
    """Distil `student` from `teacher` in place on token windows [n, seq_len] (LongTensor), each optimizer step
    taking the next windows of a seeded shuffle (epochs repeat when the budget exceeds the windows).
    `state`: a Recovery.state_dict to continue from; `on_step(recovery)` runs after every step (progress,
    checkpoints; an exception raised there stops the run with the student as it is)."""
    run = Recovery(student, teacher, config, windows)
    if state is not None:
        run.load_state_dict(state)
    with checkpointed(student, config.checkpointing):
        while not run.done:
            run.step()
            if on_step is not None:
                on_step(run)
    return run.finish()
