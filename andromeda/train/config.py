"""Training configuration: `TrainConfig`, plain data next to the model's `ModelConfig`.

Offers `TrainConfig` (every knob of a run, with attribute docstrings), `split_overrides`
(route `--set` keys: `train.*` here, everything else to the model) and `training_dtype`.
The same `apply_overrides` as the model config turns command-line strings into typed values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from andromeda import devices
from andromeda.errors import ConfigError, check

DTYPES = ("auto", "bf16", "fp32")
PARALLEL = ("ddp", "fsdp")
OFFLOAD = ("none", "cpu")



@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps of the whole run (the schedule is laid over these)."""
    batch_size: int = 16
    """Sequences per micro-batch on each rank; the global batch is batch_size * grad_accum *
    world size (the number of torchrun processes)."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up to one optimizer step."""
    auto_batch: bool = False
    """On CUDA: find the largest micro-batch that fits (try and halve) and keep the global
    batch by accumulation. Ignored on CPU (with a message)."""
    seq_len: Optional[int] = None
    """Tokens per training sequence; None means the model's max_seq_len."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio (Chinchilla / Llama practice: 10%)."""
    warmup_frac: float = 0.03
    """Fraction of max_steps spent in linear warmup."""
    optimizer: str = "adamw"
    """'adamw', 'adamw8bit' or 'galore' (the last two from andromeda.train.lowmem)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices only (see optim.param_groups)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    dtype: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32'."""
    compile: bool = False
    """torch.compile the model (applied from outside, see parallel.py)."""
    parallel: str = "ddp"
    """Under torchrun: 'ddp' (every rank holds the whole model) or 'fsdp' (FSDP2: parameters,
    gradients and optimizer state sharded over the ranks; checkpoints sharded too). 'fsdp'
    without torchrun runs as a world of one."""
    offload: str = "none"
    """With parallel=fsdp: 'cpu' keeps parameter shards, gradients and optimizer state in host
    memory and runs the optimizer there; 'none' keeps them on the device."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA for the fp32 parts."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'."""
    log_every: int = 10
    """Steps between metrics.jsonl lines (and progress-bar updates)."""
    eval_every: int = 200
    """Steps between validation passes; 0 validates only at the end."""
    eval_batches: int = 8
    """Micro-batches per validation pass (always the same ones, so passes compare)."""
    save_every: int = 500
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 3
    """Step checkpoints kept besides the best one."""
    doc_mask: bool = False
    """Packed pretraining: attend only within a document (needs end-of-text ids in the data)."""
    sft_pack: bool = False
    """SFT: pack several examples per row with a document mask instead of padding each."""
    tensorboard: bool = True
    """Also write TensorBoard events when tensorboard is installed."""
    distill_alpha: float = 0.5
    """With --distill-from: weight of the teacher's soft targets; the loss per token is
    (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student) (see train/distill.py)."""
    distill_temperature: float = 2.0
    """With --distill-from: the temperature T both models' logits are divided by in the KL term."""

    def __post_init__(self):
        check(self.max_steps >= 1, f"train.max_steps must be >= 1, got {self.max_steps}")
        check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        check(self.seq_len is None or self.seq_len >= 2, f"train.seq_len must be >= 2, got {self.seq_len}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(0 <= self.warmup_frac < 1, f"train.warmup_frac must be in [0, 1), got {self.warmup_frac}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        check(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        check(self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)")
        check(self.dtype in DTYPES, f"train.dtype={self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        check(self.parallel in PARALLEL,
              f"train.parallel={self.parallel!r} is not supported; choose one of {', '.join(PARALLEL)}")
        check(self.offload in OFFLOAD,
              f"train.offload={self.offload!r} is not supported; choose one of {', '.join(OFFLOAD)}")
        check(self.offload == "none" or self.parallel == "fsdp",
              "train.offload=cpu needs train.parallel=fsdp (DDP keeps the whole model on the device)")
        check(not (self.auto_batch and self.parallel == "fsdp"),
              "--batch-size auto is not supported with train.parallel=fsdp; give train.batch_size")
        check(self.log_every >= 1, "train.log_every must be >= 1")
        check(self.eval_every >= 0 and self.save_every >= 0, "train.eval_every and train.save_every must be >= 0")
        check(self.eval_batches >= 1, "train.eval_batches must be >= 1")
        check(self.keep_last >= 1, "train.keep_last must be >= 1")
        check(0 <= self.distill_alpha <= 1, f"train.distill_alpha must be in [0, 1], got {self.distill_alpha}")
        check(self.distill_temperature > 0, f"train.distill_temperature must be > 0, got {self.distill_temperature}")
        from andromeda.train.optim import OPTIMIZERS  # late: optim imports nothing from here
        check(self.optimizer in OPTIMIZERS,
               f"train.optimizer={self.optimizer!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step on one rank (times the world size for the whole run)."""
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_overrides(pairs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """['attention.heads=4', 'train.lr=1e-3'] -> (model overrides, train overrides)."""
    model, train = {}, {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key.startswith("train."):
            train[key[len("train."):]] = value
        else:
            model[key.removeprefix("model.")] = value
    return model, train


def resolve_device(cfg: TrainConfig) -> torch.device:
    return devices.resolve_device(cfg.device, "train.device")


def training_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32. bf16 needs no loss scaling (unlike fp16)."""
    if cfg.dtype == "fp32" or (cfg.dtype == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16
