"""Knowledge distillation (`andromeda train --distill-from TEACHER`): the soft-target term
against its definition (Hinton et al. 2015), the mix with the hard labels, exact resume, and
the refusals (another tokenizer, another teacher on resume)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from andromeda.checkpoint import save_checkpoint
from andromeda.cli import build_parser, main
from andromeda.data.prepare import prepare
from andromeda.data.tokenizer import CharTokenizer
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer
from andromeda.train.distill import distill_kl_sum
from andromeda.train.run import resolve_run, train_run
from andromeda.train.sft import IGNORE

STUDENT = ["--preset", "llama-tiny", "--set", "dim=32", "--set", "train.seq_len=32", "--set", "train.batch_size=4",
           "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.eval_batches=1",
           "--set", "train.lr=2e-3", "--set", "mlp.dropout=0.1", "--no-progress"]


def test_soft_term_is_t2_times_kl_of_the_tempered_distributions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 13)  # teacher with 2 padding ids
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = IGNORE  # e.g. an SFT prompt: not scored
    T = 2.5
    got = distill_kl_sum(student, teacher, targets, T)
    p = torch.softmax(teacher[..., :11] / T, -1)
    q = torch.softmax(student / T, -1)
    per_token = (p * (p.log() - q.log())).sum(-1)
    want = (per_token * (targets != IGNORE)).sum() * T * T
    torch.testing.assert_close(got, want)
    assert distill_kl_sum(student, student, targets, T).abs() < 1e-5
    assert not torch.allclose(got, (per_token.sum() * T * T))  # the masked positions matter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Prepared byte-level data and a teacher trained on it (wider than the students)."""
    root = tmp_path_factory.mktemp("distill")
    text = "".join(f"line {i % 17} says {'ab' * (i % 5)} and stops.\n" for i in range(800))
    (root / "corpus.txt").write_text(text)
    prepare([str(root / "corpus.txt")], root / "data", "byte", val_fraction=0.1, progress=False)
    teacher = root / "teacher"
    argv = ["train", "--preset", "llama-tiny", "--set", "train.seq_len=32", "--set", "train.batch_size=4",
            "--set", "train.eval_every=0", "--set", "train.eval_batches=1", "--no-progress",
            "--data", str(root / "data"), "--out", str(teacher), "--max-steps", "12"]
    assert main(argv) == 0
    return root


def student(runs, out, steps, *extra):
    return main(["train", *STUDENT, "--data", str(runs / "data"), "--out", str(out), "--max-steps", str(steps),
                 *map(str, extra)])


def records(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = final_weights(a), final_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_distilled_run_resumes_bit_for_bit(runs, tmp_path):
    teacher = runs / "teacher"
    assert student(runs, tmp_path / "straight", 6, "--distill-from", teacher) == 0
    parser, _ = build_parser()
    args = parser.parse_args(["train", *STUDENT, "--data", str(runs / "data"), "--out", str(tmp_path / "split"),
                              "--max-steps", "6", "--distill-from", str(teacher)])
    assert train_run(resolve_run(args), progress=False, stop_after=3).name == "step_0000003"
    # --resume without --distill-from keeps the run's teacher
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--max-steps", "6", "--no-progress"]) == 0
    assert same_weights(tmp_path / "straight", tmp_path / "split")
    a = [(r["step"], r["loss"], r["distill_kl"]) for r in records(tmp_path / "straight") if "loss" in r]
    b = [(r["step"], r["loss"], r["distill_kl"]) for r in records(tmp_path / "split") if "loss" in r]
    assert a == b and len(a) == 6 and all(kl > 0 for _, _, kl in a)


def test_alpha_mixes_the_teacher_in(runs, tmp_path):
    teacher = runs / "teacher"
    assert student(runs, tmp_path / "plain", 3) == 0
    assert student(runs, tmp_path / "alpha0", 3, "--distill-from", teacher, "--set", "train.distill_alpha=0") == 0
    assert student(runs, tmp_path / "alpha1", 3, "--distill-from", teacher, "--set", "train.distill_alpha=1") == 0
    assert same_weights(tmp_path / "plain", tmp_path / "alpha0")  # alpha 0: the hard labels alone
    assert not same_weights(tmp_path / "plain", tmp_path / "alpha1")  # the teacher changes the run
    # The logged loss stays the hard-label loss: equal at step 1 whatever alpha (same weights then).
    first = [records(tmp_path / name)[0]["loss"] for name in ("plain", "alpha0", "alpha1")]
    assert first[0] == first[1] == first[2]


def test_pure_distillation_moves_the_student_towards_the_teacher(runs, tmp_path):
    assert student(runs, tmp_path / "s", 12, "--distill-from", runs / "teacher", "--set", "train.distill_alpha=1",
                   "--set", "mlp.dropout=0") == 0
    kl = [r["distill_kl"] for r in records(tmp_path / "s") if "distill_kl" in r]
    assert sum(kl[-3:]) < 0.8 * sum(kl[:3])


def test_teacher_with_another_vocabulary_is_refused(runs, tmp_path, capsys):
    save_checkpoint(tmp_path / "char_teacher", Transformer(ModelConfig(vocab_size=40, dim=32, depth=1)),
                    CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,\n"))
    capsys.readouterr()
    assert student(runs, tmp_path / "s", 2, "--distill-from", tmp_path / "char_teacher") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another tokenizer" in err
    assert not (tmp_path / "s").exists()  # nothing written


def test_resume_with_another_teacher_is_refused(runs, tmp_path, capsys):
    assert student(runs, tmp_path / "s", 2, "--distill-from", runs / "teacher") == 0
    before = sorted(p.name for p in (tmp_path / "s" / "checkpoints").iterdir())
    capsys.readouterr()
    code = main(["train", "--out", str(tmp_path / "s"), "--resume", "--max-steps", "4", "--no-progress",
                 "--distill-from", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--distill-from" in err
    assert sorted(p.name for p in (tmp_path / "s" / "checkpoints").iterdir()) == before


def test_teacher_shorter_than_the_training_windows_is_refused(runs, tmp_path, capsys):
    from andromeda.data.tokenizer import ByteTokenizer

    save_checkpoint(tmp_path / "short", Transformer(ModelConfig(vocab_size=288, dim=32, depth=1, max_seq_len=16)),
                    ByteTokenizer())
    capsys.readouterr()
    assert student(runs, tmp_path / "s", 2, "--distill-from", tmp_path / "short") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_seq_len (16)" in err and not (tmp_path / "s").exists()
