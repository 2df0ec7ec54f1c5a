"""FSDP training in one process (a world of one, no torchrun): the same numbers as plain
training, with and without CPU offload; sharded checkpoints that resume exactly, convert to
and from ordinary ones, and that eval, generate and consolidate read; bad input refused before
anything is written. The multi-process tests (torchrun, gloo) are in test_fsdp_multiprocess.py."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from andromeda.checkpoint import is_sharded, load_checkpoint
from andromeda.cli import build_parser, main
from andromeda.data.prepare import prepare
from andromeda.errors import UserError
from andromeda.train import parallel
from andromeda.train.config import TrainConfig
from andromeda.train.distributed_checkpoint import check_resume
from andromeda.train.run import resolve_run, train_run

MODEL = ["--preset", "llama-tiny", "--set", "dim=32", "--set", "train.seq_len=32", "--set", "train.batch_size=4",
         "--set", "train.log_every=1", "--set", "train.eval_every=3", "--set", "train.eval_batches=1",
         "--set", "train.lr=2e-3", "--no-progress"]
FSDP = ["--set", "train.parallel=fsdp"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_data")
    text = "".join(f"line {i % 17} says {'ab' * (i % 5)} and stops.\n" for i in range(800))
    (tmp / "corpus.txt").write_text(text)
    prepare([str(tmp / "corpus.txt")], tmp / "data", "byte", val_fraction=0.1, progress=False)
    return tmp / "data"


def train(data, out, steps, *extra) -> int:
    return main(["train", *MODEL, "--data", str(data), "--out", str(out), "--max-steps", str(steps), *extra])


def curve(run: Path) -> list[float]:
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("val_loss")) for r in rows]


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def latest(run: Path) -> Path:
    return run / "checkpoints" / "latest"


def assert_same_model(a: Path, b: Path, exact: bool = True) -> None:
    ma, _, _ = load_checkpoint(a)
    mb, _, _ = load_checkpoint(b)
    for (name, p), q in zip(ma.state_dict().items(), mb.state_dict().values()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_and_offload_match_plain_training_and_the_sharded_checkpoint_is_usable(tmp_path, data, capsys):
    assert train(data, tmp_path / "plain", 6) == 0
    assert train(data, tmp_path / "fsdp", 6, *FSDP) == 0
    assert train(data, tmp_path / "offload", 6, *FSDP, "--set", "train.offload=cpu") == 0
    assert len(curve(tmp_path / "plain")) == 8
    assert curve(tmp_path / "fsdp") == pytest.approx(curve(tmp_path / "plain"), rel=1e-6)
    assert curve(tmp_path / "offload") == pytest.approx(curve(tmp_path / "fsdp"), rel=1e-6)
    step = latest(tmp_path / "fsdp").resolve()
    assert is_sharded(step) and not (step / "model.safetensors").exists()
    assert (step / "sharded" / "__0_0.distcp").exists()
    # eval, generate and consolidate read it; the user sees the plain run's numbers and text.
    assert_same_model(tmp_path / "fsdp", tmp_path / "plain", exact=False)
    capsys.readouterr()
    outputs = {}
    for name in ("plain", "fsdp"):
        assert main(["generate", "--ckpt", str(tmp_path / name), "--prompt", "line 3", "--temperature", "0",
                     "--max-new-tokens", "16", "--json"]) == 0
        outputs[name] = json.loads(capsys.readouterr().out)["text"]
    assert outputs["fsdp"] == outputs["plain"] and len(outputs["plain"]) > 0
    assert main(["consolidate", str(tmp_path / "fsdp"), "--out", str(tmp_path / "one"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
    assert (tmp_path / "one" / "model.safetensors").exists()
    assert_same_model(tmp_path / "one", tmp_path / "fsdp")
    assert main(["consolidate", str(tmp_path / "plain"), "--out", str(tmp_path / "two")]) == 2
    assert "not a sharded checkpoint" in capsys.readouterr().err


def test_fsdp_split_run_resumes_exactly(tmp_path, data, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(data, straight, 8, *FSDP, "--set", "mlp.dropout=0.1") == 0
    parser, _ = build_parser()
    args = parser.parse_args(["train", *MODEL, *FSDP, "--set", "mlp.dropout=0.1", "--data", str(data),
                              "--out", str(split), "--max-steps", "8"])
    train_run(resolve_run(args), progress=False, stop_after=4)
    assert train(data, split, 8, "--resume", "--set", "mlp.dropout=0.1") == 0  # run_config.json says fsdp
    assert f"resuming from {split / 'checkpoints' / 'step_0000004'} at step 4" in capsys.readouterr().err
    assert losses(split) == losses(straight) and len(losses(split)) == 8
    assert_same_model(split, straight)


def test_checkpoints_move_between_ddp_and_fsdp(tmp_path, data):
    """An ordinary checkpoint resumes under FSDP and a sharded one without it: the curve is the
    uninterrupted run's (to float tolerance: the optimizer state crosses formats)."""
    assert train(data, tmp_path / "straight", 8, "--set", "train.save_every=4") == 0
    for first, then, name in ((), FSDP, "to_fsdp"), (FSDP, ("--set", "train.parallel=ddp"), "to_ddp"):
        run = tmp_path / name
        parser, _ = build_parser()
        args = parser.parse_args(["train", *MODEL, *first, "--data", str(data), "--out", str(run),
                                  "--max-steps", "8"])
        train_run(resolve_run(args), progress=False, stop_after=4)
        assert train(data, run, 8, "--resume", *then) == 0
        assert [s for s, _ in losses(run)] == list(range(1, 9))
        assert [v for _, v in losses(run)] == pytest.approx([v for _, v in losses(tmp_path / "straight")],
                                                            rel=1e-5), name
        assert is_sharded(latest(run).resolve()) == (name == "to_fsdp")


def test_resume_of_a_sharded_run_under_another_model_config_is_refused(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert train(data, run, 2, *FSDP) == 0
    before = (run / "run_config.json").read_text()
    listing = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert train(data, run, 4, "--resume", "--set", "attention.heads=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model config" in err[0] and "attention.heads" in err[0]
    assert (run / "run_config.json").read_text() == before
    assert latest(run).resolve().name == "step_0000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == listing


def test_resume_keeps_the_global_batch_or_names_the_setting(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert train(data, run, 4, *FSDP, "--set", "train.save_every=2") == 0
    capsys.readouterr()
    assert train(data, run, 6, "--resume", "--set", "train.batch_size=2") == 2
    err = capsys.readouterr().err
    assert "global batch of 4" in err and "--set train.grad_accum=2" in err
    assert latest(run).resolve().name == "step_0000004"
    # The named setting is accepted: 2 x grad_accum 2 draws the same windows as 4.
    assert train(data, run, 6, "--resume", "--set", "train.batch_size=2", "--set", "train.grad_accum=2") == 0
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()][-1] == 6


def test_world_sizes_that_cannot_keep_the_global_batch(tmp_path, data):
    run = tmp_path / "run"
    assert train(data, run, 2, *FSDP) == 0  # global batch 4 on one rank
    folder = latest(run).resolve()
    cfg = load_checkpoint(folder)[0].cfg
    check_resume(folder, cfg, TrainConfig(batch_size=2), world=2)  # 2 ranks x 2 keeps 4
    with pytest.raises(UserError, match="3 ranks cannot share evenly"):
        check_resume(folder, cfg, TrainConfig(batch_size=1), world=3)
    with pytest.raises(UserError, match="--set train.batch_size=1"):
        check_resume(folder, cfg, TrainConfig(batch_size=4, grad_accum=2), world=2)


def test_metadata_that_would_run_code_is_refused(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert train(data, run, 2, *FSDP) == 0
    meta = latest(run).resolve() / "sharded" / ".metadata"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    meta.write_bytes(pickle.dumps(Evil()))
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(run), "--data", str(data), "--json"]) == 2
    out = capsys.readouterr()
    assert "pwned" not in out.out and "refusing to load builtins.print" in out.err


@pytest.mark.parametrize("sets, message", [
    (["train.offload=cpu"], "train.offload=cpu needs train.parallel=fsdp"),
    (["train.parallel=zero3"], "train.parallel='zero3' is not supported"),
])
def test_bad_parallel_settings_exit_2(tmp_path, data, capsys, sets, message):
    argv = [a for s in sets for a in ("--set", s)]
    assert train(data, tmp_path / "run", 2, *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_sharded_init_keeps_only_this_ranks_slice():
    """The init rule draws the whole tensor and keeps the slice of the shard: the same values
    as one process, for any slice (checked here with a 1-rank mesh over a model that is
    compared to its plain twin, including a tied head)."""
    import torch.distributed as dist

    from andromeda.model.transformer import build_model
    from andromeda.presets import get_preset
    info = parallel.init_distributed("cpu", "fsdp")
    try:
        cfg = get_preset("gpt2-tiny")
        torch.manual_seed(3)
        ref = build_model(cfg, device="meta").to_empty(device="cpu")
        ref.head.weight = ref.embed.weight
        ref.init_weights()
        torch.manual_seed(3)
        sharded = parallel.apply_fsdp(build_model(cfg, device="meta"), torch.device("cpu"), None)
        assert sharded.head.weight is sharded.embed.weight
        for name, p in sharded.state_dict().items():
            assert torch.equal(p.full_tensor(), ref.state_dict()[name]), name
        sizes = parallel.local_state_bytes(sharded, torch.optim.AdamW(sharded.parameters()))
        assert sizes["params"] == sum(p.numel() * 4 for p in ref.parameters()) and sizes["optimizer"] == 0
    finally:
        parallel.shutdown_distributed(info)
    assert not dist.is_initialized()


def test_load_file_is_what_an_ordinary_checkpoint_holds(tmp_path, data):
    """consolidate writes exactly the tensors the model has (the tied head once)."""
    assert train(data, tmp_path / "run", 2, *FSDP) == 0
    assert main(["consolidate", str(tmp_path / "run"), "--out", str(tmp_path / "one")]) == 0
    model, _, _ = load_checkpoint(tmp_path / "one")
    stored = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert set(stored) == set(model.state_dict()) - ({"head.weight"} if model.cfg.tie_embeddings else set())


def test_activation_checkpointing_composes_with_fsdp(tmp_path, data, monkeypatch):
    import torch.utils.checkpoint as tuc
    calls = []
    real = tuc.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(tuc, "checkpoint", spy)
    assert train(data, tmp_path / "plain", 3) == 0
    assert not calls
    assert train(data, tmp_path / "ac", 3, *FSDP, "--set", "block.checkpoint_activations=true") == 0
    assert len(calls) == 3 * 2  # each of the 2 blocks in each of the 3 steps (validation runs without)
    assert curve(tmp_path / "ac") == pytest.approx(curve(tmp_path / "plain"), rel=1e-6)


@pytest.mark.slow
def test_compile_and_activation_checkpointing_compose_with_fsdp_and_offload(tmp_path, data):
    assert train(data, tmp_path / "plain", 4) == 0
    assert train(data, tmp_path / "compiled", 4, *FSDP, "--set", "train.offload=cpu", "--set", "train.compile=true",
                 "--set", "block.checkpoint_activations=true") == 0
    assert curve(tmp_path / "compiled") == pytest.approx(curve(tmp_path / "plain"), rel=1e-5)


def test_full_disk_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path, data, capsys, monkeypatch):
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    import andromeda.train.distributed_checkpoint as dcp_ckpt
    saves = []

    class FullOnSecondSave(FileSystemWriter):
        def write_data(self, plan, planner):
            saves.append(1)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write_data(plan, planner)
    monkeypatch.setattr(dcp_ckpt, "FileSystemWriter", FullOnSecondSave)
    run = tmp_path / "run"
    assert train(data, run, 6, *FSDP, "--set", "train.save_every=2", "--set", "train.eval_every=0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "step_0000002" in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002"]
    monkeypatch.setattr(dcp_ckpt, "FileSystemWriter", FileSystemWriter)
    assert train(data, run, 6, "--resume") == 0
    assert [s for s, _ in losses(run)] == list(range(1, 7))


def test_resume_skips_a_sharded_checkpoint_with_a_truncated_shard(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert train(data, run, 4, *FSDP, "--set", "train.save_every=2") == 0
    shard = next((run / "checkpoints" / "step_0000004" / "sharded").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])  # a truncated copy
    capsys.readouterr()
    assert train(data, run, 5, "--resume") == 0
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and str(shard) in err
    assert f"resuming from {run / 'checkpoints' / 'step_0000003'} at step 3" in err  # saved by validation
    assert [step for step, _ in losses(run)][-2:] == [4, 5]
