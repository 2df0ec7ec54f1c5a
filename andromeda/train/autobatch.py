"""`--batch-size auto`: the largest micro-batch that fits on the GPU, the global batch kept.

Offers `auto_micro_batch(model, cfg, device, dtype) -> TrainConfig` (the search itself,
try-and-halve over divisors of the global batch, is `parallel.largest_micro_batch`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import torch

from andromeda.model.transformer import Transformer
from andromeda.train.config import TrainConfig
from andromeda.train.parallel import cuda_fits, largest_micro_batch
from andromeda.train.trainer import autocast, cross_entropy_sum


def auto_micro_batch(model: Transformer, cfg: TrainConfig, device: torch.device,
                     dtype: Optional[torch.dtype]) -> TrainConfig:
    """`--batch-size auto`: the largest micro-batch whose forward and backward fit on the GPU,
    with grad_accum raised so that batch_size x grad_accum stays the requested global batch.
    On CPU there is no memory limit to probe: the given batch is kept, with a message."""
    if device.type != "cuda":
        print(f"--batch-size auto needs a CUDA device; on {device.type} keeping train.batch_size="
              f"{cfg.batch_size} (x grad_accum {cfg.grad_accum})", file=sys.stderr)
        return cfg
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    model.to(device).train()

    def trial(batch: int) -> None:
        x = torch.randint(0, model.cfg.vocab_size, (batch, seq_len), device=device)
        try:
            with autocast(device, dtype):
                loss = cross_entropy_sum(model(x), x) / x.numel()
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)

    global_batch = cfg.global_batch
    micro = largest_micro_batch(cuda_fits(trial), global_batch)
    print(f"--batch-size auto: micro-batch {micro} x grad_accum {global_batch // micro} "
          f"(global batch {global_batch})", file=sys.stderr)
    return dataclasses.replace(cfg, batch_size=micro, grad_accum=global_batch // micro, auto_batch=False)
