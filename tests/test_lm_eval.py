"""lm-evaluation-harness with `--model andromeda`: offline tasks written here (YAML + JSONL).

Checks: rolling loglikelihood of a text equals `andromeda eval`'s loss on it (same windows),
with a negative control; loglikelihood equals the model's own log-softmax and does not depend
on the batch; generate_until equals a greedy loop over full forward passes, cut at the stop
string; an unknown task is one line and exit 2.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from andromeda.checkpoint import save_checkpoint  # noqa: E402
from andromeda.cli import main as andromeda_main  # noqa: E402
from andromeda.data.tokenizer import ByteTokenizer  # noqa: E402
from andromeda.model.config import ModelConfig  # noqa: E402
from andromeda.model.transformer import Transformer  # noqa: E402

ROLL_TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
             "the slings and arrows of outrageous fortune, or to take arms against a sea.")  # 160 bytes
MC = [{"question": "The cat sat on the", "choices": ["mat", "moon", "sea"], "answer": 0},
      {"question": "One, two,", "choices": ["three", "seven"], "answer": 0},
      {"question": "Red sky at", "choices": ["night", "noon", "dusk", "dawn"], "answer": 0}]
GEN = [{"prompt": "abc", "target": "d"}, {"prompt": "Hello there", "target": "x"}]


def _write_tasks(folder):
    folder.mkdir()
    for name, rows in (("roll", [{"text": ROLL_TEXT}]), ("mc", MC), ("gen", GEN)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (folder / "roll.yaml").write_text(
        "task: toy_roll\n" + common.format(path=folder / "roll.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (folder / "mc.yaml").write_text(
        "task: toy_mc\n" + common.format(path=folder / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        "task: toy_gen\n" + common.format(path=folder / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['e']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(vocab_size=257, dim=32, depth=2, max_seq_len=64,
                                     attention=dict(heads=4), position=dict(kind="rope")))
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper than at init, so that context changes the scores (negative controls)
        for p in model.parameters():
            p.mul_(3.0)
    save_checkpoint(tmp / "ckpt", model, ByteTokenizer())
    _write_tasks(tmp / "tasks")
    return tmp, model


def _evaluate(tmp, tasks, batch_size, max_length=16):
    import lm_eval

    import andromeda.interop.lm_eval  # noqa: F401  registers the model

    return lm_eval.simple_evaluate(model="andromeda", model_args=f"ckpt={tmp / 'ckpt'},max_length={max_length}",
                                   tasks=tasks, batch_size=batch_size, device="cpu", log_samples=True,
                                   task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp / "tasks"),
                                                                                   include_defaults=False))


def _resps(results, task):
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_rolling_loglikelihood_equals_andromeda_eval(setup, capsys):
    tmp, _ = setup
    (tmp / "roll.txt").write_text(ROLL_TEXT)
    res = _evaluate(tmp, ["toy_roll"], batch_size=4)
    total = _resps(res, "toy_roll")[0]
    total = total[0] if isinstance(total, (list, tuple)) else total
    capsys.readouterr()
    row = {}
    for seq_len in (16, 8):
        assert andromeda_main(["eval", "--ckpt", str(tmp / "ckpt"), "--data", str(tmp / "roll.txt"),
                               "--seq-len", str(seq_len), "--json", "--device", "cpu"]) == 0
        row[seq_len] = json.loads(capsys.readouterr().out)
    assert row[16]["tokens"] == len(ROLL_TEXT) == 160
    assert abs(-total / 160 - row[16]["loss"]) < 1e-5
    bpb = res["results"]["toy_roll"]["bits_per_byte,none"]
    assert abs(bpb - row[16]["loss"] / math.log(2)) < 1e-5
    assert abs(-total / 160 - row[8]["loss"]) > 1e-3, (total, row)  # negative control: other windows, other loss


def test_loglikelihood_batched_and_generation(setup):
    tmp, model = setup
    one = _evaluate(tmp, ["toy_mc", "toy_gen"], batch_size=1, max_length=64)
    four = _evaluate(tmp, ["toy_mc", "toy_gen"], batch_size=4, max_length=64)
    tok = ByteTokenizer()
    for doc, got1, got4 in zip(MC, _resps(one, "toy_mc"), _resps(four, "toy_mc")):
        ctx = tok.encode(doc["question"])
        for choice, (lp1, _), (lp4, _) in zip(doc["choices"], got1, got4):
            ids = torch.tensor(ctx + tok.encode(" " + choice))  # the harness's target delimiter
            with torch.no_grad():
                logp = F.log_softmax(model(ids[None, :-1])[0].float(), -1)
            want = logp[len(ctx) - 1:].gather(-1, ids[len(ctx):, None]).sum().item()
            assert abs(lp1 - want) < 1e-4 and abs(lp4 - want) < 1e-4, (doc, choice, lp1, lp4, want)
    for doc, got1, got4 in zip(GEN, _resps(one, "toy_gen"), _resps(four, "toy_gen")):
        ids = tok.encode(doc["prompt"])
        with torch.no_grad():  # greedy over full forward passes: no cache, no engine
            for _ in range(6):
                ids.append(int(model(torch.tensor(ids)[None])[0, -1].argmax()))
        text = tok.decode(ids[len(tok.encode(doc["prompt"])):])
        want = text.split("e")[0]
        assert got1[0] == want and got4[0] == want, (doc, got1, got4, text)


@pytest.mark.slow  # the harness indexes its thousands of built-in task files first (~25 s here)
def test_unknown_task_is_one_line_exit_2(setup, capsys):
    from andromeda.interop.lm_eval import main

    tmp, _ = setup
    code = main(["--model", "andromeda", "--model_args", f"ckpt={tmp / 'ckpt'}", "--tasks", "no_such_task_xyz",
                 "--include_path", str(tmp / "tasks"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("lm_eval: error:") and "no_such_task_xyz" in err[-1]
