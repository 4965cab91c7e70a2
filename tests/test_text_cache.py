"""FrozenTextCache: cached features equal the tower's, a byte-bounded LRU store, one row per miss."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from open_clip.hf_model import HFTextEncoder
from transformers import BertConfig

from cliptune.train.module import FrozenTextCache

CTX, HIDDEN, VOCAB, PAD = 12, 16, 200, 0
ROW_BYTES = CTX * 8 + HIDDEN * 4  # int64 token row (the key) + float32 pooled vector


@pytest.fixture
def tower() -> HFTextEncoder:
    """A tiny randomly initialised BERT behind open_clip's HF adapter, locked like a LiT run."""
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=CTX, pad_token_id=PAD)
    text = HFTextEncoder("tiny-bert", output_dim=8, config=cfg, pooler_type="mean_pooler", proj_type="linear")
    text.lock()
    return text.eval()


def _captions(n: int, seed: int, min_len: int = 2, max_len: int = CTX) -> torch.Tensor:
    """``n`` distinct right-padded token rows of random length (the row number is in the first two)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, CTX), generator=g)
    i = torch.arange(n)
    ids[:, 0], ids[:, 1] = 1 + i % (VOCAB - 1), 1 + i // (VOCAB - 1)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    ids[torch.arange(CTX) >= lengths[:, None]] = PAD
    return ids


def _reference(text: HFTextEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """The tower on the whole uncached batch, padding included."""
    with torch.no_grad():
        mask = (tokens != PAD).long()
        return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask).float()


class _CountRows:
    """Wraps the transformer's forward, recording the rows of every call."""

    def __init__(self, text: HFTextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[torch.Tensor] = []
        forward = text.transformer.forward

        def counted(*args, **kwargs):
            self.calls.append(kwargs["input_ids"].clone())
            return forward(*args, **kwargs)

        monkeypatch.setattr(text.transformer, "forward", counted)

    @property
    def rows(self) -> int:
        return sum(len(c) for c in self.calls)


def test_cached_features_equal_the_uncached_tower(tower):
    """Repeats, padding and hits from earlier steps: every step equals the tower on the full batch,
    pooled and projected."""
    cache = FrozenTextCache(tower)
    pool = _captions(10, seed=1, max_len=7)  # short captions: the trimmed batch is narrower than CTX
    pool[3] = torch.arange(1, CTX + 1)  # one full-width row, to mix widths
    steps = [[0, 1, 0, 2, 2, 0], [1, 3, 4, 4, 5], [5, 0, 1, 6, 7, 8, 9, 6], [9, 8, 0, 0]]
    for idx in steps:
        tokens = pool[idx]
        torch.testing.assert_close(cache.pooled(tokens), _reference(tower, tokens), atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(cache(tokens), tower(tokens), atol=1e-5, rtol=1e-4)
    assert len(cache.store) == 10
    assert cache.nbytes == 10 * ROW_BYTES


def test_store_is_a_byte_bounded_lru(tower):
    """A small budget is never exceeded; the least recently used entry goes first, one at a time."""
    cache = FrozenTextCache(tower, max_bytes=3 * ROW_BYTES + ROW_BYTES // 2)  # room for 3 entries
    a, b, c, d, e = _captions(5, seed=2)
    key = {name: t.numpy().tobytes() for name, t in zip("abcde", (a, b, c, d, e))}

    def step(*rows: torch.Tensor) -> None:
        tokens = torch.stack(rows)
        torch.testing.assert_close(cache.pooled(tokens), _reference(tower, tokens), atol=1e-5, rtol=1e-4)
        assert cache.nbytes <= cache.max_bytes
        assert cache.nbytes == sum(FrozenTextCache.entry_bytes(k, v) for k, v in cache.store.items())

    step(a, b)
    step(c, a)  # a is used again: b is now the oldest
    assert list(cache.store) == [key["b"], key["a"], key["c"]]
    step(d)
    assert list(cache.store) == [key["a"], key["c"], key["d"]]  # b evicted alone, a kept
    step(a, e)
    assert list(cache.store) == [key["d"], key["a"], key["e"]]  # c evicted, a (a hit) kept
    assert cache.nbytes == 3 * ROW_BYTES


def test_batch_larger_than_the_budget(tower):
    """A batch whose distinct captions alone exceed the budget is still answered exactly, and the
    store keeps its most recent entries instead of emptying."""
    cache = FrozenTextCache(tower, max_bytes=4 * ROW_BYTES)
    tokens = _captions(12, seed=3)[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 5]]
    torch.testing.assert_close(cache.pooled(tokens), _reference(tower, tokens), atol=1e-5, rtol=1e-4)
    assert len(cache.store) == 4 and cache.nbytes == 4 * ROW_BYTES
    assert list(cache.store) == [r.numpy().tobytes() for r in tokens[8:12]]

    tiny = FrozenTextCache(tower, max_bytes=ROW_BYTES - 1)  # no entry fits: nothing stored, still exact
    torch.testing.assert_close(tiny.pooled(tokens), _reference(tower, tokens), atol=1e-5, rtol=1e-4)
    assert len(tiny.store) == 0 and tiny.nbytes == 0


def test_transformer_runs_once_per_distinct_uncached_caption(tower, monkeypatch):
    """Rows computed == distinct captions not in the store: repeats and hits cost nothing."""
    counter = _CountRows(tower, monkeypatch)
    cache = FrozenTextCache(tower, max_bytes=4 * ROW_BYTES)
    pool = _captions(6, seed=4)
    key = [r.numpy().tobytes() for r in pool]

    def computed(call: torch.Tensor) -> set[int]:
        """Which captions of ``pool`` a (padding-trimmed) transformer call ran on."""
        return {key.index(r.numpy().tobytes()) for r in torch.nn.functional.pad(call, (0, CTX - call.shape[1]))}

    cache.pooled(pool[[0, 1, 0, 2, 1, 0]])
    assert counter.rows == 3 and computed(counter.calls[-1]) == {0, 1, 2}
    cache.pooled(pool[[2, 3, 3, 0, 4, 4]])  # 0 and 2 are hits; 3 and 4 once each
    assert len(counter.calls) == 2 and counter.rows == 5 and computed(counter.calls[-1]) == {3, 4}
    cache.pooled(pool[[3, 0, 2, 4, 2]])  # all cached: the transformer does not run
    assert len(counter.calls) == 2
    cache.pooled(pool[[5, 5]])  # evicts only the least recently used entry, 3
    assert counter.rows == 6 and key[3] not in cache.store
    assert list(cache.store) == [key[0], key[2], key[4], key[5]]
    cache.pooled(pool[[1, 4]])  # 1 was evicted earlier and is computed again, alone
    assert counter.rows == 7 and computed(counter.calls[-1]) == {1}


def test_large_batch_is_one_pass(tower, monkeypatch):
    """4096 distinct captions: one transformer call of 4096 rows, then all hits; the lookup builds its
    row indices in one dict pass (no ``list.index`` search per caption)."""
    tokens = _captions(4096, seed=5)
    assert len({r.numpy().tobytes() for r in tokens}) == 4096
    ref = _reference(tower, tokens)
    counter = _CountRows(tower, monkeypatch)
    cache = FrozenTextCache(tower)

    index_calls = []
    source = inspect.getfile(FrozenTextCache)  # not pooled.__code__: no_grad wraps it

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__qualname__", "") == "list.index" \
                and frame.f_code.co_filename == source:
            index_calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        got = cache.pooled(tokens)
    finally:
        sys.setprofile(None)
    assert index_calls == []
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert len(counter.calls) == 1 and counter.rows == 4096
    assert len(cache.store) == 4096 and cache.nbytes == 4096 * ROW_BYTES

    perm = torch.randperm(4096)
    torch.testing.assert_close(cache.pooled(tokens[perm]), ref[perm], atol=1e-5, rtol=1e-4)
    assert len(counter.calls) == 1
