"""Knowledge distillation: a student learns from a trained teacher's soft targets.

Offers `load_teacher(path, tokenizer, seq_len, device)` (the teacher checkpoint, frozen, in
eval mode, refused unless it uses the student's tokenizer), `check_same_tokenizer` and
`distill_kl_sum(student_logits, teacher_logits, targets, temperature)`.

The objective is Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network":

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

per target token, with alpha = train.distill_alpha and T = train.distill_temperature. The T^2
keeps the soft term's gradients on the same scale as the hard term's when T changes. Both terms
skip the positions the hard loss skips (IGNORE targets, e.g. SFT prompts).

The teacher runs in eval mode (no dropout) with requires_grad off, under torch.no_grad rather
than torch.inference_mode: the KL's backward reads the teacher's probabilities, and autograd
refuses to save inference-mode tensors. A resumed run keeps its teacher (run_config.json), and
a resume that names another teacher is refused (run.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from andromeda.errors import UserError
from andromeda.train.sft import IGNORE


def _contents(tok) -> object:
    """What makes two tokenizers the same: the spec, and for file-backed ones the file itself."""
    if tok is None:
        return None
    inner = getattr(tok, "tok", None)  # HFTokenizer: the whole tokenizer.json
    return (tok.spec(), inner.to_str() if inner is not None else getattr(tok, "proto", None))


def check_same_tokenizer(teacher_folder: Path, tokenizer) -> None:
    """Refuse a teacher whose tokenizer differs from the training data's (one line)."""
    from andromeda.checkpoint import checkpoint_folder, read_config
    from andromeda.data.tokenizer import load_tokenizer

    folder = checkpoint_folder(Path(teacher_folder))
    spec = read_config(folder).get("tokenizer")
    theirs = load_tokenizer(spec, folder) if spec else None
    if _contents(theirs) != _contents(tokenizer):
        raise UserError(f"teacher {folder} uses another tokenizer ({_describe(theirs)}) than the training data "
                        f"({_describe(tokenizer)}); distillation needs the same tokenizer")


def load_teacher(path: Path, tokenizer, seq_len: int, device: torch.device) -> torch.nn.Module:
    """The teacher model: float32, on `device`, eval mode, no gradients."""
    from andromeda.checkpoint import checkpoint_folder, load_checkpoint

    folder = checkpoint_folder(Path(path))
    check_same_tokenizer(folder, tokenizer)
    teacher, _, _ = load_checkpoint(folder, device=device, dtype=torch.float32)
    if teacher.cfg.max_seq_len < seq_len:
        raise UserError(f"teacher max_seq_len ({teacher.cfg.max_seq_len}) is shorter than train.seq_len ({seq_len})")
    teacher.to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def _describe(tok) -> str:
    return "none" if tok is None else f"{tok.kind}, {tok.vocab_size} ids"


def distill_kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """Sum over target tokens of T^2 * KL(teacher_T || student_T), in float32.

    Logits beyond the shorter vocabulary (padding rows of one model) are dropped: both models
    share the tokenizer, so those ids never occur."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = F.log_softmax(student_logits[..., :v].float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[..., :v].float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (B, T)
    return (kl * (targets != IGNORE)).sum() * temperature ** 2
