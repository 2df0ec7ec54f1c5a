"""From command-line arguments to a running `Trainer`.

Offers `resolve_run(args) -> RunPlan` (model and training config, data, seed, resume point,
all checked before anything is written) and `train_run(plan) -> Path` (builds the model,
tokenizer, loaders and trainer; returns the final checkpoint folder).

Resolution order, later wins: TrainConfig defaults; the preset's training settings
(`preset_training`, e.g. its learning rate); the run's saved run_config.json (with --resume);
--preset / --config / the --init checkpoint's model; --set; --max-steps, --batch-size.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from andromeda.checkpoint import checkpoint_folder, load_weights, read_config
from andromeda.errors import ConfigError, UserError
from andromeda.jsonfile import read_json
from andromeda.model.config import ModelConfig, apply_overrides
from andromeda.model.transformer import Transformer, build_model
from andromeda.presets import preset_dict, preset_training
from andromeda.train import checkpoint as ckpt
from andromeda.train.config import TrainConfig, resolve_device, split_overrides, training_dtype
from andromeda.train.interrupt import GracefulStop
from andromeda.train.parallel import DistInfo, init_distributed, shutdown_distributed
from andromeda.train.resume import resume_point

DEFAULT_SEED = 1337


@dataclass
class RunPlan:
    run_dir: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    data_dir: Optional[Path]
    sft: Optional[Path]
    init: Optional[Path]
    seed: int
    resume_from: Optional[Path]
    dist: DistInfo
    device: torch.device
    resume_requested: bool = False
    distill_from: Optional[Path] = None

    @property
    def is_main(self) -> bool:
        return self.dist.main

    def resolved(self) -> dict:
        return {"model": self.model_cfg.to_dict(), "train": self.train_cfg.to_dict(),
                "data": str(self.data_dir) if self.data_dir else None,
                "sft": str(self.sft) if self.sft else None, "init": str(self.init) if self.init else None,
                "seed": self.seed, "distill_from": str(self.distill_from) if self.distill_from else None}


def resolve_run(args) -> RunPlan:
    run_dir = Path(args.out)
    saved = read_json(run_dir / ckpt.RUN_CONFIG, "run config") if (run_dir / ckpt.RUN_CONFIG).exists() else {}
    resume_from = None
    if args.resume:
        resume_from = resume_point(run_dir)  # refuses when every checkpoint is damaged
    elif ckpt.step_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out")
    base = saved if args.resume else {}

    model_dict, train_dict = base.get("model"), dict(base.get("train") or {})
    init = Path(args.init) if args.init else (Path(base["init"]) if base.get("init") else None)
    init = checkpoint_folder(init) if init is not None else None
    if args.preset:
        model_dict = preset_dict(args.preset)
        train_dict = {**preset_training(args.preset), **train_dict}
    elif args.config:
        data = read_json(Path(args.config), "config file")
        if "model" in data:
            for key in ("model", "train"):
                if not isinstance(data.get(key) or {}, dict):
                    raise ConfigError(f"{key} in {args.config} must be a mapping of its fields, "
                                      f"got {type(data[key]).__name__} {data[key]!r}")
            model_dict, train_dict = data["model"], {**train_dict, **(data.get("train") or {})}
        else:
            model_dict = data
    elif args.init and resume_from is None:
        model_dict = read_config(init)["model"]
    if model_dict is None and init is not None:
        model_dict = read_config(init)["model"]
    if model_dict is None and args.resume:
        raise UserError(f"nothing to resume: {run_dir} holds no checkpoint and no {ckpt.RUN_CONFIG}; "
                        "start the run with --preset NAME or --config FILE (without --resume)")
    if model_dict is None:
        raise UserError("give a model: --preset NAME, --config FILE or --init CKPT (or --resume an existing run)")

    model_sets, train_sets = split_overrides(args.set)
    model_cfg = apply_overrides(ModelConfig.from_dict(model_dict), model_sets)
    train_cfg = _train_overrides(_train_from_dict(train_dict), train_sets)
    extra = {}
    if args.max_steps is not None:
        extra["max_steps"] = str(args.max_steps)
    if args.batch_size is not None:
        if args.batch_size == "auto":
            extra["auto_batch"] = "true"
        else:
            extra["batch_size"], extra["auto_batch"] = args.batch_size, "false"
    train_cfg = _train_overrides(train_cfg, extra)

    seq_len = train_cfg.seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise UserError(f"train.seq_len ({seq_len}) exceeds the model's max_seq_len ({model_cfg.max_seq_len}); "
                        f"lower train.seq_len or --set max_seq_len={seq_len}")

    sft = Path(args.sft) if args.sft else (Path(base["sft"]) if base.get("sft") else None)
    if sft is not None and not sft.is_file():
        raise UserError(f"SFT data file not found: {sft}")
    if sft is not None and init is None and resume_from is None:
        raise UserError("--sft needs --init CKPT: instruction tuning starts from a trained checkpoint "
                        "and uses its tokenizer")
    data_dir = Path(args.data) if args.data else (Path(base["data"]) if base.get("data") else None)
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir}; run `andromeda prepare --out {data_dir}` first")
    if data_dir is None and sft is None:
        data_dir = run_dir / "data"  # filled with the default corpus in train_run

    teacher = getattr(args, "distill_from", None)
    distill_from = checkpoint_folder(Path(teacher)) if teacher else None
    if args.resume and teacher and str(distill_from) != base.get("distill_from"):
        raise UserError(f"{run_dir} was trained with --distill-from {base.get('distill_from')}; resume it with "
                        "that teacher (or leave --distill-from out to keep it)")
    if distill_from is None and base.get("distill_from"):
        distill_from = Path(base["distill_from"])  # a resumed run keeps its teacher
    if distill_from is not None:
        # A missing or foreign folder, or a teacher shorter than the training windows, is refused
        # before anything is written.
        teacher_len = ModelConfig.from_dict(read_config(distill_from)["model"]).max_seq_len
        if teacher_len < seq_len:
            raise UserError(f"teacher max_seq_len ({teacher_len}) is shorter than train.seq_len ({seq_len})")
        if data_dir is not None and (data_dir / "meta.json").exists():
            from andromeda.data.prepare import open_prepared
            from andromeda.train.distill import check_same_tokenizer
            check_same_tokenizer(distill_from, open_prepared(data_dir).tokenizer)
    seed = args.seed if args.seed is not None else base.get("seed", DEFAULT_SEED)
    device = resolve_device(train_cfg)
    dist = init_distributed(device.type, train_cfg.parallel)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    return RunPlan(run_dir, model_cfg, train_cfg, data_dir, sft, init, seed, resume_from, dist, device,
                   resume_requested=bool(args.resume), distill_from=distill_from)


def _train_overrides(cfg: TrainConfig, sets: dict) -> TrainConfig:
    """apply_overrides for training fields, with messages that name keys as typed (train.x)."""
    try:
        return apply_overrides(cfg, sets)
    except ConfigError as e:
        text = str(e)
        for key in sets:
            text = text.replace(f"key: {key}", f"key: train.{key}")
            if text.startswith(f"{key}="):
                text = "train." + text
        raise ConfigError(text) from None


def _train_from_dict(d: dict) -> TrainConfig:
    from andromeda.model.config import _build
    return _build(TrainConfig, d, "train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_run_config(plan: RunPlan) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    path = plan.run_dir / ckpt.RUN_CONFIG
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(plan.resolved(), indent=2))
    os.replace(tmp, path)


def _build_model(plan: RunPlan) -> Transformer:
    if plan.init is not None and plan.resume_from is None:
        from safetensors.torch import load_file
        weights = plan.init / "model.safetensors"
        if not weights.exists():
            raise UserError(f"--init {plan.init} has no model.safetensors")
        model = build_model(plan.model_cfg, device="meta")
        load_weights(model, load_file(str(weights)), str(weights))
        return model
    # Built on the meta device and initialised once (not twice, as constructing on the CPU
    # does), so the init draws only init_weights' random numbers, which a sharded model draws
    # the same way (parallel.apply_fsdp materialises an FSDP model shard by shard): one seed,
    # one model, whatever the parallelism.
    model = build_model(plan.model_cfg, device="meta")
    if plan.train_cfg.parallel == "fsdp":
        return model
    model.to_empty(device="cpu")
    if plan.model_cfg.tie_embeddings:
        model.head.weight = model.embed.weight  # to_empty unties
    model.init_weights()
    return model


def _tokenizer(plan: RunPlan):
    """The tokenizer of the data (pretraining) or of the checkpoint (SFT, --init)."""
    from andromeda.data.tokenizer import load_tokenizer
    if plan.sft is not None:
        source = plan.resume_from or plan.init
        spec = read_config(source).get("tokenizer")
        if not spec:
            raise UserError(f"{source} holds no tokenizer; SFT needs one to encode the records")
        return load_tokenizer(spec, source)
    from andromeda.data.prepare import open_prepared
    return open_prepared(plan.data_dir).tokenizer


def _prepare_default(plan: RunPlan) -> None:
    if plan.sft is not None or plan.data_dir != plan.run_dir / "data":
        return
    if plan.is_main and not (plan.data_dir / "meta.json").exists():
        from andromeda.data.prepare import prepare_default_corpus
        prepare_default_corpus(plan.data_dir)
    if plan.dist.world > 1:
        import torch.distributed as dist
        dist.barrier()


def _loaders(plan: RunPlan, tokenizer):
    cfg, seq_len = plan.train_cfg, plan.train_cfg.seq_len or plan.model_cfg.max_seq_len
    if plan.sft is not None:
        from andromeda.train.sft import SFTLoader, load_sft, sft_val_loader
        train_ex, val_ex = load_sft(plan.sft, tokenizer, seq_len)
        seed = plan.seed + 7919 * plan.dist.rank  # each rank draws its own batches
        train = SFTLoader(train_ex, cfg.batch_size, seq_len, seed, cfg.sft_pack, plan.device)
        make_val = (lambda: sft_val_loader(val_ex, cfg.batch_size, seq_len, cfg.sft_pack, plan.device)) \
            if val_ex else None
        return train, make_val
    from andromeda.data.loader import TokenLoader
    prefetch = 2 if plan.device.type == "cuda" else 0  # CPU cores are busy computing
    train = TokenLoader(plan.data_dir, "train", cfg.batch_size, seq_len, plan.seed, doc_mask=cfg.doc_mask,
                        device=plan.device, rank=plan.dist.rank, world_size=plan.dist.world, prefetch=prefetch)

    def make_val():  # seed 0: the same windows at every validation
        return TokenLoader(plan.data_dir, "val", cfg.batch_size, seq_len, 0, doc_mask=cfg.doc_mask,
                           device=plan.device, rank=plan.dist.rank, world_size=plan.dist.world)
    try:
        make_val()
    except UserError as e:
        if plan.is_main:
            print(f"no validation: {e}", file=sys.stderr)
        return train, None
    return train, make_val


def _check_vocab(plan: RunPlan, tokenizer) -> None:
    if tokenizer is not None and tokenizer.vocab_size > plan.model_cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                        f"{plan.model_cfg.vocab_size}; add --set vocab_size={tokenizer.vocab_size}")


def train_run(plan: RunPlan, progress: bool = True, stop_after: Optional[int] = None) -> Path:
    from andromeda.train.autobatch import auto_micro_batch
    from andromeda.train.trainer import Trainer

    try:
        if plan.resume_from is not None:  # before anything is written
            from andromeda.train.distributed_checkpoint import check_resume
            check_resume(plan.resume_from, plan.model_cfg, plan.train_cfg, plan.dist.world)
        _prepare_default(plan)
        tokenizer = _tokenizer(plan)
        _check_vocab(plan, tokenizer)
        seed_everything(plan.seed)
        model = _build_model(plan)
        if plan.train_cfg.auto_batch:
            plan.train_cfg = auto_micro_batch(model, plan.train_cfg, plan.device,
                                              training_dtype(plan.train_cfg, plan.device))
        train_loader, make_val = _loaders(plan, tokenizer)
        meta = {"run": str(plan.run_dir), "train": plan.train_cfg.to_dict(), "seed": plan.seed,
                "data": str(plan.data_dir) if plan.data_dir else None, "sft": str(plan.sft) if plan.sft else None}
        teacher = None
        if plan.distill_from is not None:
            from andromeda.train.distill import load_teacher
            teacher = load_teacher(plan.distill_from, tokenizer, plan.train_cfg.seq_len or plan.model_cfg.max_seq_len,
                                   plan.device)
            meta["distill_from"] = str(plan.distill_from)
        trainer = Trainer(plan.run_dir, model, tokenizer, plan.train_cfg, train_loader, make_val, plan.device,
                          meta=meta, dist=plan.dist, progress=progress, teacher=teacher)
        if plan.resume_from is not None:
            trainer.resume(plan.resume_from)
        # Every check has passed: only now does the run folder change.
        if plan.is_main:
            _write_run_config(plan)
            ckpt.clean_partial(plan.run_dir)
            print(_summary(plan, model), flush=True)
            if plan.resume_from is not None:
                print(f"resuming from {plan.resume_from} at step {trainer.step} of {plan.train_cfg.max_steps}",
                      file=sys.stderr, flush=True)
            elif plan.resume_requested:
                print(f"--resume: no checkpoint in {plan.run_dir} yet; starting from step 0", file=sys.stderr,
                      flush=True)
        with GracefulStop() as stop:
            return trainer.fit(stop_after=stop_after, should_stop=lambda: _agreed(stop.signum, plan))
    finally:
        shutdown_distributed(plan.dist)


def _summary(plan: RunPlan, model: Transformer) -> str:
    """The one line `train` prints before it starts; the full config is in run_config.json."""
    m, t = plan.model_cfg, plan.train_cfg
    params = sum(p.numel() for p in model.parameters())
    seq_len = t.seq_len or m.max_seq_len
    return (f"train: {params / 1e6:.2f}M parameters ({m.depth} layers x {m.dim}), {t.max_steps} steps of "
            f"{t.batch_size * t.grad_accum} x {seq_len} tokens, lr {t.lr:g}, seed {plan.seed}, on {plan.device}; "
            f"full config: {plan.run_dir / ckpt.RUN_CONFIG}")


def _agreed(signum: Optional[int], plan: RunPlan) -> Optional[int]:
    """The stop request, made the same on every rank (a signal may reach only some of them)."""
    if plan.dist.world == 1:
        return signum
    import torch.distributed as dist
    flag = torch.tensor([signum or 0], device=plan.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag) or None
