"""The training loop.

Offers `Trainer` (one run: optimizer, schedule, accumulation, autocast, clipping,
validation, metrics, checkpoints, exact resume), `cross_entropy_sum` and `validation_loss`.
`--batch-size auto` is in autobatch.py, the throughput benchmark in benchmark.py.

One optimizer step: the learning rate is set from the step alone (schedule.py); the
micro-batches of the step are drawn first, so the loss can be averaged over every target
token of the global batch (exact for padded SFT batches too); each micro-batch adds its
share of the loss plus the model's auxiliary losses (MoE balance terms, already weighted by
the layers that made them) to the gradients; the global gradient norm is clipped; a
non-finite loss or gradient stops the run before the update touches the weights. With a
teacher (knowledge distillation, train/distill.py) each micro-batch's loss mixes the hard
labels with the teacher's soft targets; the logged `loss` stays the hard-label loss, so runs
with and without a teacher compare, and `distill_kl` is logged beside it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from andromeda.errors import UserError
from andromeda.model.compat import upgrade_state_dict
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer
from andromeda.train import checkpoint as ckpt
from andromeda.train import distributed_checkpoint as dcp_ckpt
from andromeda.train.config import TrainConfig, training_dtype
from andromeda.train.flops import device_peak_flops, flops_per_token, mfu
from andromeda.train.interrupt import TrainingInterrupted
from andromeda.train.metrics import MetricsLog, routing_metrics
from andromeda.train.optim import build_optimizer
from andromeda.train.parallel import DistInfo, all_gather, no_sync, parallelize, plain
from andromeda.train.schedule import lr_at, warmup_steps
from andromeda.train.sft import IGNORE


class TrainingDiverged(UserError):
    """The loss or the gradient stopped being finite."""


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss over targets that are not IGNORE (computed in float32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader, batches: int, device: torch.device,
             dtype: Optional[torch.dtype]) -> float:
    """Mean loss per target token over `batches` batches of `loader`."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for _ in range(batches):
        x, y, doc = loader.next_batch()
        with autocast(device, dtype):
            logits = model(x, doc_ids=doc)
        total += cross_entropy_sum(logits, y).double()
        count += int((y != IGNORE).sum())
    model.train(was_training)
    return float(total) / max(count, 1)


class Trainer:
    """Train `model` on `train_loader` into `run_dir`.

    `make_val_loader()` returns a fresh validation loader (same batches every call) or None.
    Call `resume(folder)` before `fit()` to continue a run exactly.
    """

    def __init__(self, run_dir: Path, model: Transformer, tokenizer, cfg: TrainConfig, train_loader,
                 make_val_loader: Optional[Callable[[], object]], device: torch.device,
                 meta: Optional[dict] = None, dist: Optional[DistInfo] = None, progress: bool = True,
                 teacher: Optional[torch.nn.Module] = None):
        self.teacher = teacher  # frozen, eval mode (load_teacher); None: plain training
        self.run_dir, self.raw, self.tokenizer, self.cfg = Path(run_dir), model, tokenizer, cfg
        self.train_loader, self.make_val_loader = train_loader, make_val_loader
        self.device, self.dtype = device, training_dtype(cfg, device)
        self.meta, self.dist, self.progress = dict(meta or {}), dist or DistInfo(), progress
        self.seq_len = cfg.seq_len or model.cfg.max_seq_len
        if device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # DDP wraps the model; FSDP shards it in place (self.raw is then self.model), and
        # materialises it when it was built on the meta device.
        self.model = parallelize(self.raw, cfg, self.dist, device, self.dtype)
        self.raw.train()
        self.optimizer = build_optimizer(self.raw, cfg)
        self.warmup = warmup_steps(cfg.max_steps, cfg.warmup_frac)
        self.step, self.best_val, self.elapsed, self.tokens_seen = 0, math.inf, 0.0, 0
        self.flops_per_token = flops_per_token(self.raw, self.seq_len)
        self.peak_flops = device_peak_flops(device, self.dtype)
        self.last_saved: Optional[Path] = None
        self.layer_stats: dict = {}  # statistics the model returned with the last micro-batch

    # ----- state -------------------------------------------------------------------------
    def resume(self, folder: Path) -> None:
        """Load weights, optimizer, step, RNG and data position from a step checkpoint."""
        folder = Path(folder)
        state = ckpt.load_train_state(folder)
        stored = state["config"]["model"]
        saved = ModelConfig.from_dict(stored).to_dict()  # configs of older format versions are converted
        if saved != self.raw.cfg.to_dict():
            diff = _dict_diff(saved, self.raw.cfg.to_dict())
            raise UserError(f"cannot resume from {folder}: it was trained with another model config "
                            f"({diff}); use the same --preset/--config/--set or a new --out")
        if self.cfg.parallel == "fsdp" or dcp_ckpt.is_sharded(folder):  # resharded as needed
            dcp_ckpt.load_training_state(folder, self.raw, self.optimizer, state)
        else:
            weights = upgrade_state_dict(load_file(str(folder / "model.safetensors"), device=str(self.device)),
                                         stored)
            if self.raw.cfg.tie_embeddings:
                weights["head.weight"] = weights["embed.weight"]
            self.raw.load_state_dict(weights, strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.best_val = int(state["step"]), float(state["best_val"])
        self.elapsed, self.tokens_seen = float(state["elapsed_s"]), int(state["tokens_seen"])
        rank = min(self.dist.rank, len(state["rng"]) - 1)
        ckpt.restore_rng(state["rng"][rank])
        self.train_loader.load_state_dict(state["loader"][rank])
        self.last_saved = folder

    def _train_state(self) -> dict:
        per_rank = all_gather((ckpt.capture_rng(), self.train_loader.state_dict()), self.dist)
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "scheduler": {"kind": "warmup_cosine", "step": self.step, "warmup": self.warmup},
                "rng": [r for r, _ in per_rank], "loader": [d for _, d in per_rank],
                "best_val": self.best_val, "elapsed_s": self.elapsed, "tokens_seen": self.tokens_seen,
                "config": {"model": self.raw.cfg.to_dict(), "train": self.cfg.to_dict()}}

    def save(self, is_best: bool) -> Path:
        state = self._train_state()  # every rank takes part in the gather
        meta = dict(self.meta, step=self.step, best_val=_finite_or_none(self.best_val), world=self.dist.world)
        if self.cfg.parallel == "fsdp":  # every rank writes its own shards
            del state["optimizer"]  # sharded next to the weights
            self.last_saved = dcp_ckpt.save_sharded(self.run_dir, self.step, self.raw, self.optimizer,
                                                    self.tokenizer, meta, state, is_best, self.cfg.keep_last,
                                                    self.dist)
            return self.last_saved
        if self.dist.main:
            ckpt.save_step(self.run_dir, self.step, self.raw, self.tokenizer, meta, state, is_best,
                           self.cfg.keep_last)
        if self.dist.world > 1:
            import torch.distributed as dist
            dist.barrier()  # no rank reads the checkpoint before it exists
        self.last_saved = ckpt.step_dir(self.run_dir, self.step)
        return self.last_saved

    # ----- one step ----------------------------------------------------------------------
    def train_step(self) -> float:
        """Run optimizer step `self.step + 1`; returns its mean loss per target token."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg.max_steps, cfg.lr, self.warmup, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = [self.train_loader.next_batch() for _ in range(cfg.grad_accum)]
        # Kept on the device: an int() here would make the host wait for the previous step.
        targets = sum((y != IGNORE).sum() for _, y, _ in batches).clamp_min(1)
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        kl_sum = torch.zeros((), device=self.device)
        alpha = cfg.distill_alpha
        for i, (x, y, doc) in enumerate(batches):
            with no_sync(self.model, i == len(batches) - 1), autocast(self.device, self.dtype):
                out = self.model(x, doc_ids=doc, with_aux=True)
                loss = cross_entropy_sum(out.logits, y) / targets
                aux = out.aux_loss() / len(batches)
                kl = self._distill_kl(x, y, doc, out.logits) / targets if self.teacher is not None else 0.0
            self.layer_stats = out.stats  # of the last micro-batch, for the metrics log
            objective = loss + aux if self.teacher is None else (1 - alpha) * loss + alpha * kl + aux
            objective.backward()
            loss_sum += loss.detach()
            kl_sum += kl.detach() if torch.is_tensor(kl) else kl
            aux_sum += aux.detach() if torch.is_tensor(aux) else aux
            self.tokens_seen += x.numel() * self.dist.world
        norm = (plain(torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip))
                if cfg.grad_clip > 0 else torch.zeros((), device=self.device))
        stats = torch.stack([loss_sum.float(), norm.float().to(self.device), aux_sum.float(), kl_sum.float()])
        if self.dist.world > 1:  # every rank logs, checks and stops on the same global numbers
            import torch.distributed as dist
            dist.all_reduce(stats)
            stats /= self.dist.world
        loss_value, norm_value, self.aux, self.kl = stats.tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            where = f"; the last good checkpoint is {self.last_saved}" if self.last_saved else ""
            raise TrainingDiverged(f"{what} became {loss_value if what == 'loss' else norm_value} at step "
                                   f"{self.step + 1} (lr {lr:.3g}); stopped before updating the weights{where}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.lr, self.grad_norm = lr, norm_value
        return loss_value

    def _distill_kl(self, x, y, doc, student_logits) -> torch.Tensor:
        from andromeda.train.distill import distill_kl_sum
        with torch.no_grad():  # no_grad, not inference_mode: the KL's backward reads these logits
            teacher_logits = self.teacher(x, doc_ids=doc)
        return distill_kl_sum(student_logits, teacher_logits, y, self.cfg.distill_temperature)

    def validate(self) -> Optional[float]:
        loader = self.make_val_loader() if self.make_val_loader else None
        if loader is None:
            return None
        val = validation_loss(self.raw, loader, self.cfg.eval_batches, self.device, self.dtype)
        # Every rank must reach the same save decision, so all use the mean over ranks.
        return sum(all_gather(val, self.dist)) / self.dist.world

    # ----- the loop ----------------------------------------------------------------------
    def fit(self, stop_after: Optional[int] = None,
            should_stop: Optional[Callable[[], Optional[int]]] = None) -> Path:
        """Train until max_steps (or until step `stop_after`, checkpointed, for split runs)
        and return the final checkpoint folder. `should_stop()`, asked after every step,
        returns a signal number to save a checkpoint and raise TrainingInterrupted."""
        cfg, end = self.cfg, min(self.cfg.max_steps, stop_after or self.cfg.max_steps)
        log = MetricsLog(self.run_dir, self.step, cfg.tensorboard, enabled=self.dist.main)
        bar = self._progress_bar()
        t_last, tokens_last, started = time.perf_counter(), self.tokens_seen, time.perf_counter() - self.elapsed
        try:
            while self.step < end:
                loss = self.train_step()
                self.elapsed = time.perf_counter() - started
                if self.step % cfg.log_every == 0 or self.step == end:
                    now = time.perf_counter()
                    tok_s = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                    t_last, tokens_last = now, self.tokens_seen
                    record = {"step": self.step, "loss": loss, "lr": self.lr, "grad_norm": self.grad_norm,
                              "tokens_per_s": tok_s, "elapsed_s": self.elapsed}
                    if self.aux:
                        record["aux_loss"] = self.aux
                    if self.teacher is not None:
                        record["distill_kl"] = self.kl
                    record.update(routing_metrics(self.layer_stats))
                    util = mfu(tok_s / self.dist.world, self.flops_per_token, self.peak_flops)
                    if util is not None:
                        record["mfu"] = util
                    log.log(record)
                    if bar is not None:
                        bar.set_postfix_str(_postfix(record), refresh=False)
                if bar is not None:
                    bar.update(1)
                self._validate_and_save(log, final=self.step == end)
                signum = should_stop() if should_stop is not None else None
                if signum is not None and self.step < end:
                    raise TrainingInterrupted(signum, self.step, self._save_if_unsaved())
        finally:
            if bar is not None:
                bar.close()
            log.close()
        return self._save_if_unsaved()  # e.g. a resumed run that was already complete

    def _save_if_unsaved(self) -> Path:
        if self.last_saved is None or self.last_saved.name != ckpt.step_dir(self.run_dir, self.step).name:
            self.save(is_best=False)
        return ckpt.step_dir(self.run_dir, self.step)

    def _validate_and_save(self, log: MetricsLog, final: bool) -> None:
        cfg, improved = self.cfg, False
        if final or (cfg.eval_every and self.step % cfg.eval_every == 0):
            val = self.validate()
            if val is not None:
                if not math.isfinite(val):
                    raise TrainingDiverged(f"validation loss became {val} at step {self.step}")
                improved = val < self.best_val
                self.best_val = min(self.best_val, val)
                log.log({"step": self.step, "val_loss": val, "elapsed_s": self.elapsed})
                if self.progress and self.dist.main:
                    print(f"step {self.step}: val_loss {val:.4f}", file=sys.stderr)
        if final or improved or (cfg.save_every and self.step % cfg.save_every == 0):
            self.save(is_best=improved or (final and self.make_val_loader is None))

    def _progress_bar(self):
        if not (self.progress and self.dist.main):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.max_steps, initial=self.step, file=sys.stderr, desc="train",
                    unit="step", dynamic_ncols=True, mininterval=0.5)


def _postfix(record: dict) -> str:
    parts = [f"loss={record['loss']:.4f}", f"lr={record['lr']:.2e}", f"tok/s={record['tokens_per_s']:,.0f}"]
    if "mfu" in record:
        parts.append(f"mfu={100 * record['mfu']:.1f}%")
    return " ".join(parts)


def _finite_or_none(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _dict_diff(a: dict, b: dict, prefix: str = "") -> str:
    """'attention.heads: 4 -> 8, ...' for the first differing leaves of two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _dict_diff(va, vb, f"{prefix}{key}.")
            if sub:
                out.append(sub)
        elif va != vb:
            out.append(f"{prefix}{key}: checkpoint {va!r}, now {vb!r}")
    return ", ".join(out[:4])
