"""FSDP across processes (torchrun, gloo on 127.0.0.1): 2 ranks == one process, a killed rank
stops the job and `--resume` continues exactly, a 2-rank checkpoint resumes on 1 and on 3
ranks along the same curve, each rank holds about 1/world of the state DDP holds, and two
"nodes" rendezvous over c10d. All slow: each test starts several torchrun jobs."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from andromeda.checkpoint import load_checkpoint
from andromeda.cli import main
from andromeda.data.prepare import prepare

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "llama-tiny", "--set", "dim=32", "--set", "train.seq_len=32", "--set", "train.log_every=1",
          "--set", "train.eval_every=4", "--set", "train.eval_batches=1", "--set", "train.lr=2e-3", "--no-progress"]
FSDP = ["--set", "train.parallel=fsdp"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_mp_data")
    text = "".join(f"line {i % 17} says {'ab' * (i % 5)} and stops.\n" for i in range(1500))
    (tmp / "corpus.txt").write_text(text)
    prepare([str(tmp / "corpus.txt")], tmp / "data", "byte", val_fraction=0.1, progress=False)
    return tmp / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, extra=(), popen=False, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *extra,
           "-m", "andromeda", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_args(data, out, steps, *extra):
    return ["train", *COMMON, "--data", str(data), "--out", str(out), "--max-steps", str(steps), *extra]


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.endswith("}")]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_two_rank_fsdp_matches_one_process(tmp_path, data):
    """2 ranks x micro-batch 2 under FSDP == one process x 4: the same windows (the loader
    gives rank r the r-th block), the same initial weights (sharded init draws the one-process
    numbers), gradients averaged by the reduce-scatter."""
    torchrun(2, *train_args(data, tmp_path / "fsdp", 8, *FSDP, "--set", "train.batch_size=2"))
    assert main(train_args(data, tmp_path / "one", 8, "--set", "train.batch_size=4")) == 0
    shards = sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints" / "latest" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # every rank wrote its own
    a, b = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert [s for s, _ in a] == list(range(1, 9))
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5)
    fsdp_model, _, _ = load_checkpoint(tmp_path / "fsdp")
    one_model, _, _ = load_checkpoint(tmp_path / "one")
    for (name, p), q in zip(fsdp_model.state_dict().items(), one_model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_sharded_init_equals_one_process_for_every_tiny_preset_on_two_ranks(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "import andromeda.presets as P\n"
        "from andromeda.model.transformer import build_model\n"
        "from andromeda.train.parallel import apply_fsdp, init_distributed\n"
        "info = init_distributed('cpu', 'fsdp')\n"
        "bad = []\n"
        "for name in [n for n in P.PRESETS if n.endswith('-tiny')]:\n"
        "    cfg = P.get_preset(name)\n"
        "    torch.manual_seed(0)\n"
        "    ref = build_model(cfg, device='meta').to_empty(device='cpu')\n"
        "    if cfg.tie_embeddings: ref.head.weight = ref.embed.weight\n"
        "    ref.init_weights()\n"
        "    torch.manual_seed(0)\n"
        "    m = apply_fsdp(build_model(cfg, device='meta'), torch.device('cpu'), None)\n"
        "    for k, v in m.state_dict().items():\n"
        "        if not torch.equal(v.full_tensor(), ref.state_dict()[k]): bad.append(name + ':' + k)\n"
        "print('checked', len(P.PRESETS), 'bad', bad)\n"
        "# Negative control: DTensor's own ops (per-shard random draws, split into copies) differ.\n"
        "import andromeda.train.parallel as par\n"
        "class Plain(torch.overrides.TorchFunctionMode):\n"
        "    def __init__(self, model): super().__init__()\n"
        "    def __torch_function__(self, f, t, a=(), k=None): return f(*a, **(k or {}))\n"
        "par._ShardedInit = Plain\n"
        "cfg = P.get_preset('llama-tiny')\n"
        "torch.manual_seed(0)\n"
        "m = apply_fsdp(build_model(cfg, device='meta'), torch.device('cpu'), None)\n"
        "torch.manual_seed(0)\n"
        "ref = build_model(cfg, device='meta').to_empty(device='cpu')\n"
        "ref.init_weights()\n"
        "same = all(torch.equal(v.full_tensor(), ref.state_dict()[k]) for k, v in m.state_dict().items())\n"
        "print('control same', same)\n"
        "dist.destroy_process_group()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(script)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("bad []") == 2, proc.stdout
    assert proc.stdout.count("control same False") == 2, proc.stdout


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_killing_one_rank_stops_the_job_and_resume_continues_exactly(tmp_path, data):
    steps, args = 40, ("--set", "train.batch_size=2", "--set", "train.save_every=5", *FSDP)
    torchrun(2, *train_args(data, tmp_path / "reference", steps, *args))
    run = tmp_path / "killed"
    job = torchrun(2, *train_args(data, run, steps, *args), popen=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and job.poll() is None:
            logged = losses(run) if (run / "metrics.jsonl").exists() else []
            if logged and logged[-1][0] >= 12:
                break
            time.sleep(0.05)
        ranks = _children(job.pid)
        assert job.poll() is None and len(ranks) == 2, "the job ended before it could be killed"
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.time()
        job.wait(timeout=90)  # the agent sees the dead rank and stops the other one
        assert job.returncode != 0 and time.time() - killed_at < 90
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=30)
        job.stdout.close()
        job.stderr.close()
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
               for pid in ranks)
    assert losses(run)[-1][0] < steps
    torchrun(2, *train_args(data, run, steps, "--resume", *args))
    assert losses(run) == losses(tmp_path / "reference")
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]


def test_two_rank_checkpoint_resumes_on_one_and_three_ranks(tmp_path, data):
    """Saved by 2 FSDP ranks x 3 sequences (global batch 6) at step 4; resumed in one process
    (DDP format, x grad_accum 2) and on 3 FSDP ranks x 2: the same windows per step, so the
    curve follows the uninterrupted 2-rank run."""
    base = tmp_path / "two"
    torchrun(2, *train_args(data, base, 8, *FSDP, "--set", "train.batch_size=3", "--set", "train.save_every=4"))
    reference = losses(base)

    def cut_at_step_4(dest: Path) -> Path:
        shutil.copytree(base, dest, symlinks=True)
        shutil.rmtree(dest / "checkpoints" / "step_0000008")
        for name in ("latest", "best"):
            (dest / "checkpoints" / name).unlink(missing_ok=True)
        return dest

    one = cut_at_step_4(tmp_path / "one")
    assert main(train_args(data, one, 8, "--resume", "--set", "train.parallel=ddp",
                           "--set", "train.grad_accum=2")) == 0
    three = cut_at_step_4(tmp_path / "three")
    torchrun(3, *train_args(data, three, 8, "--resume", "--set", "train.batch_size=2"))
    for run in (one, three):
        got = losses(run)
        assert [s for s, _ in got] == list(range(1, 9))
        assert got[:4] == reference[:4]
        assert [v for _, v in got[4:]] == pytest.approx([v for _, v in reference[4:]], rel=1e-4), run.name
    assert not (one / "checkpoints" / "latest" / "sharded").exists()
    assert (three / "checkpoints" / "latest" / "sharded" / "__2_0.distcp").exists()


def test_per_rank_state_is_about_one_over_world_of_ddp(tmp_path):
    """Parameter + gradient + optimizer bytes on each rank, measured by the benchmark's worker."""
    sizes = {}
    for setup in ("ddp", "fsdp", "fsdp+offload"):
        cmd = [sys.executable, str(REPO / "benchmarks" / "fsdp.py"), "--preset", "gpt2-tiny", "--seq", "32",
               "--batch", "2", "--steps", "1", "--worlds", "2", "--setups", setup, "--threads", "2", "--json"]
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        row = json.loads(proc.stdout)[0]
        sizes[setup] = row["params_MB"] + row["grads_MB"] + row["optimizer_MB"]
        assert row["grads_MB"] > 0 and row["optimizer_MB"] > 0
    assert sizes["fsdp"] == pytest.approx(sizes["ddp"] / 2, rel=0.1)
    assert sizes["fsdp+offload"] == pytest.approx(sizes["fsdp"], rel=0.01)


def test_two_nodes_on_one_machine(tmp_path, data):
    """torchrun --nnodes 2 with a c10d rendezvous on 127.0.0.1: two agents of one rank each
    train together like 2 local ranks (and so like one process with the global batch)."""
    port = free_port()
    args = train_args(data, tmp_path / "nodes", 6, *FSDP, "--set", "train.batch_size=2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fsdp-two-nodes",
           "-m", "andromeda", *args]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True) for _ in range(2)]
    try:
        results = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=30)
    assert [n.returncode for n in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert main(train_args(data, tmp_path / "one", 6, "--set", "train.batch_size=4")) == 0
    a, b = losses(tmp_path / "nodes"), losses(tmp_path / "one")
    assert len(a) == 6 and [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-5)
    shards = sorted(p.name for p in (tmp_path / "nodes" / "checkpoints" / "latest" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
