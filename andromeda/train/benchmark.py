"""Training throughput on random tokens (`andromeda bench train`, benchmarks/efficiency.py).

Offers `RandomTokens` (uniform random batches with the loader interface) and
`benchmark_train(preset, seq_len, batch_size, steps, compile, dtype)`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from andromeda.model.transformer import Transformer
from andromeda.train.config import TrainConfig
from andromeda.train.flops import mfu
from andromeda.train.trainer import Trainer


class RandomTokens:
    """Uniform random tokens with the loader interface, for throughput benchmarks."""

    def __init__(self, vocab: int, batch: int, seq_len: int, device: torch.device, seed: int = 0):
        self.vocab, self.batch, self.seq_len, self.device = vocab, batch, seq_len, device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def next_batch(self):
        tokens = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=self.generator)
        tokens = tokens.to(self.device, non_blocking=True)
        return tokens[:, :-1], tokens[:, 1:], None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def benchmark_train(preset, seq_len: int, batch_size: int, steps: int, compile: bool = False,
                    dtype: str = "auto", device: Optional[str] = None, warmup: int = 3) -> dict:
    """Training throughput of a preset (a name or a ModelConfig) on random tokens: tokens/s,
    MFU (None when the device peak is unknown), peak GPU memory in bytes (None on CPU) and the
    bytes held by the weights and the optimizer state. Warmup steps (compilation, allocator
    growth) are not timed. Nothing is written to disk."""
    from andromeda.presets import get_preset
    from andromeda.train.config import resolve_device
    from andromeda.train.lowmem import optimizer_state_bytes

    model_cfg = get_preset(preset) if isinstance(preset, str) else preset
    if seq_len > model_cfg.max_seq_len:
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=seq_len)
    cfg = TrainConfig(max_steps=warmup + steps, batch_size=batch_size, seq_len=seq_len, compile=compile,
                      dtype=dtype, device=device or "auto", tensorboard=False, warmup_frac=0.0)
    dev = resolve_device(cfg)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(model_cfg)
    data = RandomTokens(model_cfg.vocab_size, batch_size, seq_len, dev)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Path(tmp), model, None, cfg, data, None, dev, progress=False)
        for _ in range(warmup):
            trainer.train_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()  # each step ends in a host sync (the finiteness check)
        seconds = time.perf_counter() - start
    tokens_per_s = steps * batch_size * seq_len / seconds
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    held = weight_bytes + optimizer_state_bytes(trainer.optimizer)
    return {"tokens_per_s": tokens_per_s, "weights_and_optimizer_bytes": held,
            "mfu": mfu(tokens_per_s, trainer.flops_per_token, trainer.peak_flops),
            "peak_mem": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
            "flops_per_token": trainer.flops_per_token, "device": str(dev)}
