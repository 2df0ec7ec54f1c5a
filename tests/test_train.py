"""The trainer: schedule values, weight-decay groups, FLOPs formula, loss normalisation under
accumulation, auxiliary losses, activation checkpointing, learning a toy corpus end to end,
metrics, NaN stop, CLI errors and the benchmark entry point."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from andromeda.checkpoint import load_checkpoint
from andromeda.cli import main
from andromeda.data.prepare import prepare
from andromeda.errors import UserError
from andromeda.model.config import ModelConfig
from andromeda.model.state import Aux
from andromeda.model.transformer import Transformer
from andromeda.presets import get_preset
from andromeda.train import checkpoint as ckpt
from andromeda.train.autobatch import auto_micro_batch
from andromeda.train.benchmark import RandomTokens, benchmark_train
from andromeda.train.config import TrainConfig
from andromeda.train.flops import device_peak_flops, flops_per_token
from andromeda.train.optim import build_optimizer, param_groups
from andromeda.train.parallel import largest_micro_batch
from andromeda.train.schedule import lr_at, warmup_steps
from andromeda.train.trainer import Trainer, TrainingDiverged

CPU = torch.device("cpu")
SMALL = dict(vocab_size=64, max_seq_len=32, dim=32, depth=2, attention=dict(heads=2), mlp=dict(multiple_of=16))


def small_model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_dict({**SMALL, **changes}))


def make_trainer(tmp_path, model=None, batch=4, accum=1, seq=16, **train):
    model = model or small_model()
    train.setdefault("tensorboard", False)
    cfg = TrainConfig(max_steps=train.pop("max_steps", 10), batch_size=batch, grad_accum=accum, seq_len=seq,
                      **train)
    data = RandomTokens(model.cfg.vocab_size, batch, seq, CPU, seed=1)
    return Trainer(tmp_path, model, None, cfg, data, None, CPU, progress=False)


# ----- schedule ------------------------------------------------------------------------------

def test_schedule_values():
    peak, floor, total = 1e-3, 1e-4, 1000
    warm = warmup_steps(total, 0.03)
    assert warm == 30
    assert lr_at(0, total, peak, warm) == pytest.approx(peak / 30)
    assert lr_at(14, total, peak, warm) == pytest.approx(peak * 15 / 30)
    assert lr_at(warm - 1, total, peak, warm) == pytest.approx(peak)
    assert lr_at(warm, total, peak, warm) == pytest.approx(peak)
    # Cosine: half way through the decay the rate is half way between peak and floor.
    mid = warm + (total - 1 - warm) / 2
    assert lr_at(int(mid), total, peak, warm) == pytest.approx((peak + floor) / 2, rel=1e-2)
    assert lr_at(total - 1, total, peak, warm) == pytest.approx(floor)
    assert lr_at(total + 50, total, peak, warm) == pytest.approx(floor)
    decay = [lr_at(s, total, peak, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # Defined against the closed form at an arbitrary point.
    s = 700
    expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - 1 - warm)))
    assert lr_at(s, total, peak, warm) == pytest.approx(expected)
    assert warmup_steps(10, 0.0) == 0 and lr_at(0, 10, peak, 0) == pytest.approx(peak)


# ----- optimizer groups ----------------------------------------------------------------------

def test_weight_decay_only_on_matrices():
    model = small_model(position=dict(kind="learned"), norm=dict(kind="layer", bias=True),
                        attention=dict(heads=2, bias=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        is_table = name in ("embed.weight", "pos_embed.weight")
        assert (name in decay["names"]) == (p.dim() == 2 and not is_table), name
        assert (name in decay["names"]) != (name in no_decay["names"])
    assert any("norm" in n for n in no_decay["names"]) and any(n.endswith("bias") for n in no_decay["names"])
    assert "head.weight" in decay["names"] and "layers.0.mixer.wqkv.weight" in decay["names"]
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1, beta1=0.9, beta2=0.95))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_tied_head_is_not_decayed():
    model = small_model(tie_embeddings=True)
    decay, no_decay = param_groups(model, 0.1)
    assert "embed.weight" in no_decay["names"]
    assert all(p is not model.embed.weight for p in decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in model.parameters())


def test_lowmem_optimizers_build_through_the_table(monkeypatch):
    model = small_model()
    if importlib.util.find_spec("andromeda.train.lowmem") is not None:
        for name in ("adamw8bit", "galore"):
            opt = build_optimizer(model, TrainConfig(optimizer=name))
            assert isinstance(opt, torch.optim.Optimizer)
            assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    monkeypatch.setitem(sys.modules, "andromeda.train.lowmem", None)  # as if it were missing
    with pytest.raises(UserError, match="train.optimizer='galore' needs andromeda.train.lowmem"):
        build_optimizer(model, TrainConfig(optimizer="galore"))


# ----- FLOPs ---------------------------------------------------------------------------------

def test_flops_per_token_formula():
    model = small_model(position=dict(kind="learned"))
    total = sum(p.numel() for p in model.parameters())
    lookups = model.embed.weight.numel() + model.pos_embed.weight.numel()
    T, H, hd = 16, 2, 16
    assert flops_per_token(model, T) == 6 * (total - lookups) + 12 * 2 * H * hd * T
    tied = small_model(tie_embeddings=True)
    head = tied.head.weight.numel()  # the tied head still costs a matmul
    assert flops_per_token(tied, T) == 6 * sum(p.numel() for p in tied.parameters()) + 12 * 2 * H * hd * T
    assert head == 64 * 32
    assert device_peak_flops(CPU, None) is None  # MFU is left out on CPUs


# ----- one step ------------------------------------------------------------------------------

def grads_of_one_step(trainer) -> dict:
    """Run one step and return the gradients the optimizer was about to apply."""
    captured = {}
    real_step = trainer.optimizer.step

    def spy():
        captured.update({n: p.grad.clone() for n, p in trainer.raw.named_parameters() if p.grad is not None})
        real_step()
    trainer.optimizer.step = spy
    loss = trainer.train_step()
    return loss, captured


def test_accumulation_matches_one_big_batch(tmp_path):
    a = make_trainer(tmp_path / "a", batch=8, accum=1, grad_clip=0.0)
    b = make_trainer(tmp_path / "b", batch=4, accum=2, grad_clip=0.0)
    # Same tokens either way (the generator draws rows in order).
    big = RandomTokens(64, 8, 16, CPU, seed=1).next_batch()[0]
    halves = RandomTokens(64, 4, 16, CPU, seed=1)
    assert torch.equal(big, torch.cat([halves.next_batch()[0], halves.next_batch()[0]]))
    loss_a, grads_a = grads_of_one_step(a)
    loss_b, grads_b = grads_of_one_step(b)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def optimizer_view(trainer, steps):
    """What optimizer.step saw at each of `steps` steps: the rate of every group, the gradients
    and the trainer's logged gradient norm."""
    seen = []
    real_step = trainer.optimizer.step

    def spy():
        seen.append(([g["lr"] for g in trainer.optimizer.param_groups],
                     {n: p.grad.clone() for n, p in trainer.raw.named_parameters() if p.grad is not None}))
        real_step()
    trainer.optimizer.step = spy
    norms = []
    for _ in range(steps):
        trainer.train_step()
        norms.append(trainer.grad_norm)
    return seen, norms


def check_schedule_and_clipping(tmp_path):
    """The optimizer steps with the warmup-cosine rate of train.lr and with gradients clipped to
    train.grad_clip; the logged norm is the norm before clipping. Returns what failed, if anything."""
    settings = dict(max_steps=6, lr=1e-2, warmup_frac=0.34, min_lr_ratio=0.2)
    clip = 0.05
    unclipped, _ = optimizer_view(make_trainer(tmp_path / "free", grad_clip=0.0, **settings), 1)
    clipped, norms = optimizer_view(make_trainer(tmp_path / "clip", grad_clip=clip, **settings), 6)
    failures = []
    want = [lr_at(s, 6, 1e-2, 3, 0.2) for s in range(6)]
    if [lrs for lrs, _ in clipped] != [[w, w] for w in want]:
        failures.append("rate")
    raw = unclipped[0][1]
    raw_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()])).item()
    assert raw_norm > 5 * clip  # so clipping has something to do
    if norms[0] != pytest.approx(raw_norm, rel=1e-5):
        failures.append("logged norm")
    scale = clip / (raw_norm + 1e-6)  # clip_grad_norm_'s definition
    if not all(torch.allclose(clipped[0][1][n], raw[n] * scale, rtol=1e-4, atol=1e-9) for n in raw):
        failures.append("clipping")
    return failures


def test_optimizer_gets_the_scheduled_rate_and_clipped_gradients(tmp_path, monkeypatch):
    # Before: no test looked at the rate or the gradients the optimizer stepped with, so a trainer
    # that kept AdamW's constructor rate or skipped clipping passed.
    assert check_schedule_and_clipping(tmp_path / "ok") == []
    # Negative controls: a constant rate, and a clip that measures but does not scale.
    import andromeda.train.trainer as trainer_module
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "lr_at", lambda step, total, peak, *a: peak)
        assert check_schedule_and_clipping(tmp_path / "const") == ["rate"]
    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_",
                  lambda params, max_norm: torch.linalg.vector_norm(
                      torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        assert check_schedule_and_clipping(tmp_path / "noclip") == ["clipping"]


def test_aux_losses_reach_the_gradient(tmp_path):
    plain = make_trainer(tmp_path / "a", accum=2, grad_clip=0.0)
    with_aux = make_trainer(tmp_path / "b", accum=2, grad_clip=0.0)
    weight = 0.5
    norm = with_aux.raw.layers[0].mixer_norm.weight

    def add_aux(module, args, output):  # what an MoE layer does with its balance loss
        y, aux = output
        aux = Aux() if aux is None else aux
        aux.losses["test"] = aux.losses.get("test", 0.0) + weight * norm.sum()
        return y, aux
    with_aux.raw.layers[0].register_forward_hook(add_aux)
    _, g_plain = grads_of_one_step(plain)
    _, g_aux = grads_of_one_step(with_aux)
    name = "layers.0.mixer_norm.weight"
    # d(weight * sum(w))/dw = weight, added once per optimizer step over the micro-batches.
    torch.testing.assert_close(g_aux[name] - g_plain[name], torch.full_like(norm, weight), rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_is_honoured(tmp_path, monkeypatch):
    import torch.utils.checkpoint as tuc
    calls = []
    real = tuc.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(tuc, "checkpoint", spy)
    plain = make_trainer(tmp_path / "a", grad_clip=0.0)
    ckpted = make_trainer(tmp_path / "b", model=small_model(block=dict(checkpoint_activations=True)),
                          grad_clip=0.0)
    loss_a, grads_a = grads_of_one_step(plain)
    assert not calls
    loss_b, grads_b = grads_of_one_step(ckpted)
    assert len(calls) == 2  # one per block
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)


def test_nan_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, save_every=2)

    def poison(module, args, output):
        return output * float("nan") if trainer.step >= 4 else output
    trainer.raw.head.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match="step 5") as err:
        trainer.fit()
    assert "step_0000004" in str(err.value)
    assert trainer.step == 4
    assert all(torch.isfinite(p).all() for p in trainer.raw.parameters())
    latest = tmp_path / "checkpoints" / "latest"
    assert latest.resolve().name == "step_0000004"
    model, _, _ = load_checkpoint(latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----- batch size search ---------------------------------------------------------------------

def test_largest_micro_batch_halves_and_divides():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 5
    assert largest_micro_batch(fits, 24) == 3  # 24 -> 12 -> 6 -> 3: halving, divisors of 24 only
    assert tried == [24, 12, 6, 3]
    assert largest_micro_batch(lambda b: b <= 7, 20) == 5  # 20 -> 10 -> 5
    assert largest_micro_batch(lambda b: b <= 3, 12) == 3
    with pytest.raises(RuntimeError):
        largest_micro_batch(lambda b: False, 8)


def test_auto_batch_on_cpu_keeps_the_given_batch(capsys):
    cfg = TrainConfig(batch_size=6, grad_accum=2, auto_batch=True)
    assert auto_micro_batch(small_model(), cfg, CPU, None) is cfg
    assert "needs a CUDA device" in capsys.readouterr().err


# ----- end to end ----------------------------------------------------------------------------

@pytest.fixture
def toy_data(tmp_path):
    """A repetitive corpus: a byte model that has learned it predicts most bytes exactly."""
    lines = ["the cat sat on the mat.", "a dog ran in the park.", "we like green tea."]
    text = "\n".join(lines[i % 3] for i in range(1500)) + "\n"
    (tmp_path / "toy.txt").write_text(text)
    prepare([str(tmp_path / "toy.txt")], tmp_path / "data", "byte", val_fraction=0.1, progress=False)
    return tmp_path / "data"


def test_tiny_preset_learns_the_toy_corpus(tmp_path, toy_data, capsys):
    out = tmp_path / "run"
    code = main(["train", "--preset", "llama-tiny", "--data", str(toy_data), "--out", str(out), "--max-steps", "60",
                 "--set", "train.seq_len=64", "--set", "train.batch_size=8", "--set", "train.lr=3e-3",
                 "--set", "train.eval_every=30", "--set", "train.log_every=5", "--set", "train.eval_batches=2",
                 "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    final = stdout[-1]
    assert final == str(out / "checkpoints" / "step_0000060")
    resolved = json.loads((out / ckpt.RUN_CONFIG).read_text())
    assert resolved["train"]["lr"] == 3e-3 and resolved["model"]["dim"] == 64
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert [r["step"] for r in val] == [30, 60]
    assert all(set(r) >= {"step", "loss", "lr", "tokens_per_s", "elapsed_s"} for r in train)
    assert "mfu" not in train[0]  # unknown peak on CPU
    # ln(257) = 5.55 nats is chance; the toy corpus is learned well below 1 nat per byte.
    assert val[-1]["val_loss"] < 1.0, val
    # Pointers: latest is the final step; best is the lowest validation loss; both load.
    assert (out / "checkpoints" / "latest").resolve().name == "step_0000060"
    model, tok, config = load_checkpoint(out / "checkpoints" / "best")
    assert tok.vocab_size == 257 and config["meta"]["step"] == 60


def test_keep_last_and_best(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=8, save_every=1, keep_last=2, eval_every=2)
    vals = iter([3.0, 1.0, 2.0, 2.5])  # best at the second validation (step 4)
    trainer.make_val_loader = lambda: object()
    monkeypatch.setattr("andromeda.train.trainer.validation_loss", lambda *a, **k: next(vals))
    trainer.fit()
    names = sorted(p.name for _, p in ckpt.step_checkpoints(tmp_path))
    assert names == ["step_0000004", "step_0000007", "step_0000008"]
    assert (tmp_path / "checkpoints" / "best").resolve().name == "step_0000004"


@pytest.mark.parametrize("argv, message", [
    (["--preset", "no-such-preset"], "unknown preset"),
    (["--preset", "llama-tiny", "--set", "attention.no_such_key=1"], "unknown config key"),
    (["--preset", "llama-tiny", "--set", "train.no_such_key=1"], "unknown config key: train.no_such_key"),
    (["--preset", "llama-tiny", "--set", "train.dtype=fp8"], "train.dtype"),
    (["--preset", "llama-tiny", "--data", "/nonexistent/data/dir"], "data folder not found"),
    (["--preset", "llama-tiny", "--set", "train.seq_len=100000"], "max_seq_len"),
    ([], "give a model"),
])
def test_cli_errors_exit_2(tmp_path, capsys, argv, message):
    code = main(["train", *argv, "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_nan_exits_nonzero(tmp_path, toy_data, capsys):
    code = main(["train", "--preset", "llama-tiny", "--data", str(toy_data), "--out", str(tmp_path / "run"),
                 "--max-steps", "3", "--set", "init_std=1e30", "--set", "train.seq_len=32", "--no-progress"])
    assert code == 2
    assert "became nan at step 1" in capsys.readouterr().err


def test_existing_run_needs_resume(tmp_path, toy_data, capsys):
    args = ["train", "--preset", "llama-tiny", "--data", str(toy_data), "--out", str(tmp_path / "run"),
            "--max-steps", "2", "--set", "train.seq_len=32", "--set", "train.batch_size=2", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


class FakeClock:
    """time.perf_counter for the trainer module: each reading is 0.5 s after the previous one."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.5
        return self.now


def test_benchmark_train_reports_throughput(monkeypatch):
    import andromeda.train.benchmark as trainer_module

    batches = []
    real_next = trainer_module.RandomTokens.next_batch
    monkeypatch.setattr(trainer_module.RandomTokens, "next_batch",
                        lambda self: batches.append(1) or real_next(self))
    monkeypatch.setattr(trainer_module, "time", FakeClock())
    result = benchmark_train("llama-tiny", seq_len=32, batch_size=2, steps=3, compile=False, dtype="fp32",
                             device="cpu", warmup=1)
    # Warmup and timed steps each draw one batch; only the 3 timed steps of 2 x 32 tokens count,
    # over the 0.5 s the clock moved between the two readings around them.
    assert len(batches) == 1 + 3
    assert result["tokens_per_s"] == 3 * 2 * 32 / 0.5
    assert result["mfu"] is None and result["peak_mem"] is None
    model = Transformer(get_preset("llama-tiny"))
    assert result["flops_per_token"] == flops_per_token(model, 32)
    # float32 weights plus AdamW's two moments per weight (and a step counter per tensor).
    n = sum(p.numel() for p in model.parameters())
    assert 12 * n <= result["weights_and_optimizer_bytes"] <= 12 * n + 4096


def test_benchmark_train_takes_a_config():
    cfg = ModelConfig.from_dict(SMALL)
    result = benchmark_train(cfg, seq_len=16, batch_size=2, steps=1, dtype="fp32", device="cpu", warmup=1)
    model = Transformer(cfg)  # the given config, not a preset: its own FLOPs and bytes
    assert result["flops_per_token"] == flops_per_token(model, 16)
    n = sum(p.numel() for p in model.parameters())
    assert 12 * n <= result["weights_and_optimizer_bytes"] <= 12 * n + 4096


# ----- plot ----------------------------------------------------------------------------------

def _fake_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, "tokens_per_s": 1.0, "elapsed_s": s * 2.0} for s in range(1, 9)]
    lines.insert(4, {"step": 4, "val_loss": 1.5, "elapsed_s": 8.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_plot_writes_an_image(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path)
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.png")


def test_plot_without_matplotlib_or_metrics_exits_2(tmp_path, capsys, monkeypatch):
    assert main(["plot", str(tmp_path)]) == 2  # no metrics.jsonl
    assert "metrics.jsonl" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert main(["plot", str(_fake_run(tmp_path))]) == 2
    assert "pip install 'andromeda[plot]'" in capsys.readouterr().err


# ----- data parallel -------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_with_the_global_batch(tmp_path, toy_data):
    """torchrun with 2 CPU ranks (gloo), micro-batch 2 each == one process, micro-batch 4:
    the loader gives rank r the r-th block of the same windows and DDP averages gradients."""
    import subprocess
    common = ["--preset", "llama-tiny", "--set", "dim=32", "--data", str(toy_data), "--max-steps", "6",
              "--set", "train.seq_len=32", "--set", "train.log_every=1", "--set", "train.eval_every=3",
              "--set", "train.eval_batches=1", "--set", "train.lr=2e-3", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "andromeda", "train", *common, "--set", "train.batch_size=2",
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main(["train", *common, "--set", "train.batch_size=4", "--out", str(tmp_path / "one")]) == 0

    def curve(run):
        rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        return [r.get("loss", r.get("val_loss")) for r in rows]
    assert len(curve(tmp_path / "ddp")) == len(curve(tmp_path / "one")) == 8
    assert curve(tmp_path / "ddp") == pytest.approx(curve(tmp_path / "one"), rel=1e-4)
    a, _, _ = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "latest")
    b, _, _ = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)


# ----- precision and compile -----------------------------------------------------------------

def test_bf16_autocast_tracks_fp32(tmp_path):
    """The bf16 path (the CUDA default) also runs under CPU autocast: same loss to bf16 precision."""
    fp32 = make_trainer(tmp_path / "a", dtype="fp32")
    bf16 = make_trainer(tmp_path / "b", dtype="bf16")
    assert bf16.dtype == torch.bfloat16 and fp32.dtype is None
    for _ in range(3):
        assert bf16.train_step() == pytest.approx(fp32.train_step(), rel=2e-2)
    assert all(p.dtype == torch.float32 for p in bf16.raw.parameters())  # master weights stay fp32


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager = make_trainer(tmp_path / "a")
    compiled = make_trainer(tmp_path / "b", compile=True)
    for _ in range(3):
        assert compiled.train_step() == pytest.approx(eager.train_step(), rel=1e-4)
    assert set(compiled.raw.state_dict()) == set(eager.raw.state_dict())  # checkpoints keep plain names


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    trainer = make_trainer(tmp_path, max_steps=4, log_every=1, tensorboard=True)
    trainer.fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])


def test_routing_loads_are_logged_for_moe_models(tmp_path):
    model = small_model(extras=dict(moe=dict(num_experts=4, top_k=2)))
    trainer = make_trainer(tmp_path, model=model, max_steps=3, log_every=1)
    trainer.fit()
    logged = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in logged if "loss" in r]
    assert len(train_lines) == 3
    for record in train_lines:
        for layer in range(2):
            load = record[f"moe_load/layer{layer}"]
            # top-2 of 4: every assignment lands on one expert, shares sum to one.
            assert len(load) == 4 and sum(load) == pytest.approx(1.0, abs=1e-5)
            assert record[f"moe_load/layer{layer}/max_over_mean"] == pytest.approx(max(load) * 4, rel=1e-4)


def test_routing_metrics_keeps_scalars_and_summarises_vectors():
    from andromeda.train.metrics import routing_metrics
    out = routing_metrics({"mod_fraction/layer1": torch.tensor(0.25),
                           "moe_load/layer0": torch.tensor([0.5, 0.25, 0.25, 0.0])})
    assert out == {"mod_fraction/layer1": 0.25, "moe_load/layer0": [0.5, 0.25, 0.25, 0.0],
                   "moe_load/layer0/max_over_mean": 2.0}


def test_presets_bring_training_settings_that_suit_their_size(tmp_path):
    """A CPU-sized preset trains at its own learning rate without --set; --set still wins, and a
    config file (no preset) keeps TrainConfig's defaults."""
    import argparse

    from andromeda.commands.train import add_arguments
    from andromeda.presets import preset_training
    from andromeda.train.config import TrainConfig
    from andromeda.train.run import resolve_run

    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def lr_of(*argv):
        plan = resolve_run(parser.parse_args([*argv, "--out", str(tmp_path / "run")]))
        return plan.train_cfg.lr

    assert lr_of("--preset", "llama-tiny") == 3e-3 == preset_training("llama-tiny")["lr"]
    assert lr_of("--preset", "llama-tiny", "--set", "train.lr=1e-4") == 1e-4
    assert preset_training("gpt2")["lr"] == 6e-4 and preset_training("llama")["lr"] == 3e-4
    assert preset_training("andromeda-15b")["lr"] == 1.5e-4
    assert preset_training("shakespeare-char")["batch_size"] == 64
    (tmp_path / "model.json").write_text(json.dumps({"dim": 32, "depth": 1, "attention": {"heads": 2}}))
    assert lr_of("--config", str(tmp_path / "model.json")) == TrainConfig().lr
    assert not (tmp_path / "run").exists()  # resolving writes nothing


def test_adamw_uses_the_fused_kernel_on_plain_cpu_parameters_and_matches_foreach():
    """The fused CPU step is chosen for ordinary parameters and computes what the foreach
    AdamW computes (to float rounding) over several steps with weight decay."""
    from andromeda.train.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    models = [Transformer(get_preset("llama-tiny")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    fused = build_optimizer(models[0], cfg)
    assert fused.defaults["fused"] is True
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
              for g in param_groups(models[1], cfg.weight_decay) if g["params"]]
    reference = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    tokens = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        for model, opt in zip(models, (fused, reference)):
            opt.zero_grad()
            model(tokens).logsumexp(-1).mean().backward()
            opt.step()
    for a, b, s in zip(models[0].parameters(), models[1].parameters(), start):
        assert torch.allclose(a, b, atol=1e-6)
    assert max((a - s).abs().max().item() for a, s in zip(models[0].parameters(), start)) > 1e-3  # it trained
