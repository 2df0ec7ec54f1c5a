"""Weight-only int8 / int4 quantisation: codes and packing, logits close to float (with
negative controls), the compiled one-row products against the eager ones, the `quantize`
command end to end (generate and eval on its output), the round trip, and refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from andromeda.checkpoint import load_checkpoint, save_checkpoint
from andromeda.cli import main
from andromeda.data.tokenizer import ByteTokenizer
from andromeda.infer.engine import Engine
from andromeda.infer.sampling import SamplingParams
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer
from andromeda.quant import cpu_kernels, weight_only
from andromeda.quant.quantize import quantize_model
from andromeda.quant.weight_only import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "All that glitters is not gold. Fortune favours the bold. ") * 40


def tiny_cfg(**kw):
    base = dict(vocab_size=257, max_seq_len=128, dim=64, depth=2, attention=dict(heads=4, kv_heads=2))
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few seconds on TEXT, so that its greedy choices and its loss
    mean something; saved as a float checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the suite's one-thread fixture
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    data = torch.tensor(list(TEXT.encode()))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(200):
        starts = torch.randint(0, len(data) - 49, (8,))
        batch = torch.stack([data[s:s + 49] for s in starts])
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = tmp_path_factory.mktemp("quant") / "float"
    save_checkpoint(folder, model.eval(), ByteTokenizer())
    (folder.parent / "held_out.txt").write_text(TEXT[:1500])
    torch.set_num_threads(threads)
    return folder


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- codes and packing
def test_int8_codes_are_per_channel_absmax():
    w = torch.randn(16, 64) * torch.linspace(0.1, 3, 16)[:, None]
    codes, scale = quantize_int8(w)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    assert (dequantize_int8(codes, scale) - w).abs().max() <= scale.max() / 2 + 1e-6


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_packs_two_codes_a_byte_with_group_scales(group_size):
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    packed, scale = quantize_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 128) and scale.shape == (8, 256 // group_size)
    back = dequantize_int4(packed, scale, group_size)
    # Each weight within half a step of its group's scale (codes -8..7, clipped at most to 8.5 steps).
    steps = scale.repeat_interleave(group_size, dim=1)
    assert ((back - w).abs() <= steps * 1.5 + 1e-6).all()
    # The clipping search does at least as well as plain absmax / 7 in every group.
    g = w.view(8, -1, group_size)
    s7 = g.abs().amax(-1, keepdim=True) / 7
    plain = ((g / s7).round().clamp(-8, 7) * s7 - g).pow(2).sum(-1)
    assert ((back.view_as(g) - g).pow(2).sum(-1) <= plain + 1e-6).all()
    assert (back - w).pow(2).mean() < 0.015 * w.pow(2).mean()
    # Byte k of a group holds feature k (low nibble) and feature k + group / 2 (high nibble).
    g0 = packed[0, :group_size // 2]
    codes0 = torch.cat([g0 & 15, g0 >> 4]).float() - 8
    torch.testing.assert_close(codes0 * scale[0, 0], back[0, :group_size])


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_one_row_product_matches_eager(kind, rows, monkeypatch):
    """Without the CPU kernels (builds that lack them), decoding under torch.compile on CPU
    takes the multiply-and-sum over the codes; it must equal the eager product through the
    dequantised matrix."""
    monkeypatch.setattr(weight_only, "USE_CPU_KERNELS", False)
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True)
    layer = Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, 32)
    x = torch.randn(rows, 1, 128)
    with torch.no_grad():
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)
        if kind == "int4":  # negative control: the nibbles read the other way round differ
            wrong = Int4Linear.from_linear(lin, 32)
            wrong.weight_int4 = (wrong.weight_int4 << 4) | (wrong.weight_int4 >> 4)
            assert (compiled(x) - wrong(x)).abs().max() > 0.05


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cpu_kernel_products_match_the_dequantised_product_row_by_row(kind):
    """The int8 (FBGEMM) and int4 (int4pack, bfloat16 activations) kernels: within 1% of the
    exact product over the dequantised weights, eager and compiled alike; each row's result
    is the same alone or among others, bit for bit (a server's batch invariance); codes
    changed in place are repacked, not served stale."""
    available = cpu_kernels.int8_available() if kind == "int8" else cpu_kernels.int4_available()
    if not available:
        pytest.skip(f"this PyTorch build has no {kind} CPU kernel")
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    layer = Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, 32)
    assert layer.has_kernel
    x = torch.randn(5, 1, 256)
    with torch.no_grad():
        exact = nn.functional.linear(x, layer.dequantized(), layer.bias)
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
        for got in (eager, compiled):
            assert _rel_err(got, exact) < 0.01
            assert not torch.equal(got, exact)  # the kernel ran: activations were quantised / rounded
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        for i in range(5):
            assert torch.equal(layer(x[i:i + 1]), eager[i:i + 1])
        codes = layer.weight_int8 if kind == "int8" else layer.weight_int4
        codes.copy_(codes.flip(0))  # in place: a stale packing would keep the old numbers
        flipped = nn.functional.linear(x, layer.dequantized(), layer.bias)
        assert _rel_err(layer(x), flipped) < 0.01 and _rel_err(flipped, exact) > 0.5


def test_int4_layers_of_other_widths_keep_the_portable_product():
    """The int4 kernel packs output widths in multiples of 16; other layers do without it."""
    layer = Int4Linear.from_linear(nn.Linear(64, 24), 32)
    assert not layer.has_kernel
    x = torch.randn(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dequantized().t() + layer.bias)


# ---------------------------------------------------------------- model quality
def _rel_err(a, b):
    """Relative RMS error of the logits."""
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tie", [False, True])
def test_quantised_logits_close_to_float(tie):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(tie_embeddings=tie)).eval()
    x = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        ref = model(x)
        errors = {}
        for bits in (8, 4):
            q = Transformer(model.cfg).eval()
            q.load_state_dict(model.state_dict())
            quantize_model(q, bits, 32)
            errors[bits] = _rel_err(q(x), ref)
        # Negative control: one int4 layer that reads its nibbles the other way round.
        w_out = q.layers[0].ffn.w_out
        w_out.weight_int4.copy_((w_out.weight_int4 << 4) | (w_out.weight_int4 >> 4))
        broken = _rel_err(q(x), ref)
    assert errors[8] < 0.015, errors
    assert errors[4] < 0.08, errors
    assert broken > 2 * errors[4], (broken, errors)


# ---------------------------------------------------------------- the command
def test_quantize_generate_and_eval_through_the_cli(trained, capsys):
    root = trained.parent
    losses, texts = {}, {}
    for name, bits in (("float", None), ("int8", 8), ("int4", 4)):
        ckpt = trained if bits is None else root / name
        if bits is not None:
            code, out, err = run_cli(capsys, "quantize", "--ckpt", trained, "--out", ckpt, "--bits", bits, "--json")
            assert code == 0, err
            report = json.loads(out)
            assert report["scheme"] == name and report["quantized_bytes"] < report["float32_bytes"] / (3 if bits == 8
                                                                                                        else 4)
            assert json.loads((ckpt / "config.json").read_text())["quantization"]["scheme"] == name
        code, out, err = run_cli(capsys, "generate", "--ckpt", ckpt, "--prompt", "The quick brown",
                                 "--max-new-tokens", 24, "--temperature", 0, "--json")
        assert code == 0, err
        texts[name] = json.loads(out)["text"]
        code, out, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--data", root / "held_out.txt", "--seq-len", 64,
                                 "--json")
        assert code == 0, err
        losses[name] = json.loads(out)["loss"]
    assert texts["float"].startswith(" fox jumps")  # the model learned its text
    assert texts["int8"] == texts["float"]
    assert texts["int4"][:12] == texts["float"][:12]
    assert abs(losses["int8"] - losses["float"]) <= 0.01 * losses["float"], losses
    assert abs(losses["int4"] - losses["float"]) <= 0.05 * losses["float"], losses


def test_chat_through_a_pipe_answers_as_the_float_model(trained, tmp_path, capsys):
    assert run_cli(capsys, "quantize", "--ckpt", trained, "--out", tmp_path / "q8", "--bits", 8)[0] == 0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    answers = []
    for ckpt in (trained, tmp_path / "q8"):
        proc = subprocess.run([sys.executable, "-m", "andromeda", "chat", "--ckpt", str(ckpt), "--max-new-tokens", "12",
                               "--temperature", "0"], input="The quick\n/exit\n", capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        answers.append(proc.stdout)
    assert answers[0].strip() and answers[1] == answers[0]


def test_round_trip_keeps_every_tensor_and_the_decoding(trained, tmp_path, capsys):
    model, tok, _ = load_checkpoint(trained)
    quantize_model(model, 4, 64)
    code, _, err = run_cli(capsys, "quantize", "--ckpt", trained, "--out", tmp_path / "q", "--bits", 4,
                           "--group-size", 64)
    assert code == 0, err
    loaded, _, config = load_checkpoint(tmp_path / "q")
    assert config["quantization"] == {"scheme": "int4", "bits": 4, "group_size": 64, "head": "int8",
                                      "embedding": "int8"}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    in_memory = Engine(model, tok).generate(["All that"], params)[0].token_ids
    assert Engine(loaded, tok).generate(["All that"], params)[0].token_ids == in_memory


def test_tied_embeddings_share_one_int8_matrix(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(tie_embeddings=True)).eval()
    quantize_model(model, 8)
    assert model.head.weight_int8 is model.embed.weight_int8
    from andromeda.quant.quantize import save_quantized
    save_quantized(tmp_path / "q", model, None, {"scheme": "int8"})
    loaded, _, _ = load_checkpoint(tmp_path / "q")
    assert loaded.head.weight_int8.data_ptr() == loaded.embed.weight_int8.data_ptr()
    x = torch.randint(0, 257, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("extra, message", [
    (["--bits", "3"], "--bits must be 8 or 4"),
    (["--bits", "4", "--group-size", "48"], "--group-size must be one of 32, 64, 128"),
    (["--bits", "8", "--group-size", "32"], "--group-size applies to --bits 4 only"),
])
def test_bad_scheme_is_one_line_exit_2_and_writes_nothing(trained, tmp_path, capsys, extra, message):
    code, out, err = run_cli(capsys, "quantize", "--ckpt", trained, "--out", tmp_path / "q", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists() and list(tmp_path.iterdir()) == []


def test_refuses_quantised_input_and_existing_output(trained, tmp_path, capsys):
    q = tmp_path / "q"
    assert run_cli(capsys, "quantize", "--ckpt", trained, "--out", q, "--bits", 8)[0] == 0
    code, _, err = run_cli(capsys, "quantize", "--ckpt", q, "--out", tmp_path / "qq", "--bits", 4)
    assert code == 2 and "already quantised" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "qq").exists()
    code, _, err = run_cli(capsys, "convert", "--to-hf", q, "--out", tmp_path / "hf")
    assert code == 2 and "is quantised" in err and len(err.strip().splitlines()) == 1
    before = {p.name: p.read_bytes() for p in q.iterdir()}
    code, _, err = run_cli(capsys, "quantize", "--ckpt", trained, "--out", q, "--bits", 4)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in q.iterdir()} == before  # untouched
    code, _, err = run_cli(capsys, "quantize", "--ckpt", trained, "--out", q, "--bits", 4, "--overwrite")
    assert code == 0, err
    assert json.loads((q / "config.json").read_text())["quantization"]["scheme"] == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary or .old folder left


def test_serve_answers_from_a_quantised_checkpoint_as_generate_does(trained, tmp_path, capsys):
    """`serve` loads through the same checkpoint loader: an int4 checkpoint served over HTTP
    completes a prompt with the text `andromeda generate` prints for it."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from tests.serve_helpers import running_server

    q = tmp_path / "q4"
    assert run_cli(capsys, "quantize", "--ckpt", trained, "--out", q, "--bits", 4)[0] == 0
    code, out, err = run_cli(capsys, "generate", "--ckpt", q, "--prompt", "All that", "--max-new-tokens", 16,
                             "--temperature", 0, "--json", "--threads", 1)
    assert code == 0, err
    expected = json.loads(out)["text"]
    with running_server(q, "--max-batch", "2") as server:
        body = {"model": "q4", "prompt": "All that", "max_tokens": 16, "temperature": 0}
        got = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert got["choices"][0]["text"] == expected
