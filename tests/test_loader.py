"""TokenLoader: windows, determinism, exact resumption, prefetch, ranks, doc ids, eval windows."""

import json

import pytest
import torch

from andromeda.data.loader import TokenLoader, iter_eval_windows
from andromeda.data.prepare import open_prepared, prepare
from andromeda.errors import UserError

EOS = 256


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(f"document {i} " + "abcdefghij"[i % 10] * (20 + 7 * i) + "\n")
    prepare([str(root)], root / "prepared", val_fraction=0.25, shard_tokens=50, progress=False)
    return root / "prepared"


def _batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _same(a, b):
    return all(torch.equal(p, q) if p is not None else q is None for ba, bb in zip(a, b) for p, q in zip(ba, bb))


def test_windows_are_stream_slices_and_targets_shift(data_dir):
    data = open_prepared(data_dir)
    loader = TokenLoader(data_dir, "train", batch_size=3, seq_len=16, seed=0)
    x, y, ids = loader.next_batch()
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64 and ids is None
    assert torch.equal(x[:, 1:], y[:, :-1])
    starts, _, _ = loader._window_starts(0, 0, 3)
    for row, s in enumerate(starts):
        assert x[row].tolist() == data.train.read(s, 16).tolist()
        assert y[row, -1].item() == int(data.train.read(s + 16, 1)[0])


def test_an_epoch_visits_every_window_once(data_dir):
    loader = TokenLoader(data_dir, "train", batch_size=1, seq_len=16, seed=3)
    offset, order = loader._epoch_plan(0)
    n = len(loader.stream)
    starts, epoch, index = loader._window_starts(0, 0, len(order))
    assert (epoch, index) == (1, 0)
    assert sorted(starts) == list(range(offset, offset + 16 * len(order), 16))
    assert 0 <= offset < 16 and offset + 16 * len(order) + 1 <= n < offset + 16 * (len(order) + 1) + 1
    assert loader._epoch_plan(1)[1].tolist() != order.tolist() or loader._epoch_plan(1)[0] != offset


def test_deterministic_given_seed(data_dir):
    a = _batches(TokenLoader(data_dir, "train", 2, 8, seed=5), 6)
    b = _batches(TokenLoader(data_dir, "train", 2, 8, seed=5), 6)
    c = _batches(TokenLoader(data_dir, "train", 2, 8, seed=6), 6)
    assert _same(a, b) and not _same(a, c)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_is_exact_across_epochs(data_dir, prefetch):
    kwargs = dict(split="train", batch_size=4, seq_len=12, seed=1, doc_mask=True, prefetch=prefetch)
    straight = TokenLoader(data_dir, **kwargs)
    epoch_windows = len(straight._epoch_plan(0)[1])
    n, m = epoch_windows // 4 + 1, 2 * epoch_windows // 4 + 3  # crosses epoch boundaries
    expected = _batches(straight, n + m)
    first = TokenLoader(data_dir, **kwargs)
    head = _batches(first, n)
    state = json.loads(json.dumps(first.state_dict()))  # small, JSON-serialisable
    first.close()
    resumed = TokenLoader(data_dir, **kwargs)
    resumed.load_state_dict(state)
    tail = _batches(resumed, m)
    straight.close(), resumed.close()
    assert state["epoch"] == 1 and state["index"] > 0  # saved inside the second epoch, not at a boundary
    assert _same(head + tail, expected)


def test_prefetch_matches_inline_and_restarts(data_dir):
    inline = _batches(TokenLoader(data_dir, "train", 2, 10, seed=2), 8)
    loader = TokenLoader(data_dir, "train", 2, 10, seed=2, prefetch=2)
    got = _batches(loader, 3)
    loader.load_state_dict(loader.state_dict())  # stops the thread; the next call restarts it
    got += _batches(loader, 5)
    loader.close()
    assert _same(got, inline)


def test_ranks_split_the_global_batch(data_dir):
    whole = TokenLoader(data_dir, "train", batch_size=4, seq_len=8, seed=9)
    ranks = [TokenLoader(data_dir, "train", batch_size=2, seq_len=8, seed=9, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        x, _, _ = whole.next_batch()
        x0, _, _ = ranks[0].next_batch()
        x1, _, _ = ranks[1].next_batch()
        assert torch.equal(torch.cat([x0, x1]), x)


def test_doc_ids_count_document_starts(data_dir):
    loader = TokenLoader(data_dir, "train", batch_size=6, seq_len=40, seed=0, doc_mask=True)
    for _ in range(3):
        x, _, ids = loader.next_batch()
        assert ids.dtype == torch.int32
        # Each document starts with EOS, so the id steps at every EOS after the first token.
        reference = torch.cumsum((x == EOS).int(), dim=1) - (x[:, :1] == EOS).int()
        assert torch.equal(ids, reference.int())
    assert TokenLoader(data_dir, "train", 2, 8, doc_mask=None).doc_mask is False  # follows meta


def test_doc_mask_none_follows_meta_either_way(data_dir, tmp_path):
    """The check above only sees meta's False, which a loader that never masks also gives."""
    for i in range(4):
        (tmp_path / f"d{i}.txt").write_text(f"document {i} " * 10)
    prepare([str(tmp_path)], tmp_path / "masked", val_fraction=0.25, doc_mask=True, progress=False)
    loader = TokenLoader(tmp_path / "masked", "train", 2, 8, doc_mask=None)
    assert loader.doc_mask is True and loader.next_batch()[2] is not None
    assert TokenLoader(data_dir, "train", 2, 8, doc_mask=None).next_batch()[2] is None


def test_eval_windows_cover_the_split_once(data_dir):
    data = open_prepared(data_dir)
    tokens = data.val.read(0, len(data.val)).tolist()
    xs, ys = [], []
    for x, y, ids in iter_eval_windows(data_dir, "val", seq_len=7, batch_size=3, doc_mask=True):
        assert torch.equal(x[:, 1:], y[:, :-1]) and ids.shape == x.shape
        xs += x.flatten().tolist()
        ys += y.flatten().tolist()
    assert ys == tokens[1:] and xs == tokens[:-1]


def test_bad_requests(data_dir):
    data = open_prepared(data_dir)
    with pytest.raises(UserError, match="fewer than seq_len"):
        TokenLoader(data_dir, "val", 2, len(data.val))
    with pytest.raises(UserError, match="unknown split"):
        TokenLoader(data_dir, "test", 2, 8)
    loader = TokenLoader(data_dir, "train", 2, 8, seed=1)
    state = loader.state_dict()
    with pytest.raises(UserError, match="seq_len"):
        TokenLoader(data_dir, "train", 2, 9, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="not a prepared data folder"):
        TokenLoader(data_dir.parent, "train", 2, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu(data_dir):
    cpu = _batches(TokenLoader(data_dir, "train", 4, 16, seed=4, doc_mask=True), 5)
    loader = TokenLoader(data_dir, "train", 4, 16, seed=4, doc_mask=True, device="cuda", prefetch=2)
    gpu = _batches(loader, 5)
    loader.close()
    assert all(t.is_cuda for b in gpu for t in b)
    assert _same(cpu, [tuple(t.cpu() for t in b) for b in gpu])
