"""Batched evaluation: vectorised baseline selectors equal the loop version they replace, bit for bit;
batched greedy decoding equals one prompt at a time (tokens, predictions and scores of `kascade eval`)."""

import pytest
import torch

from kascade.budget import budget
from kascade.eval import selectors
from kascade.reference import DEFAULT_CHUNK_BYTES, Selection, pooled_tile_scores
from models import one_thread_fixture


_one_thread = one_thread_fixture()


# ----------------------------------------------------------------------------------------------
# the oracle: the selectors as they were, one sequence and one query tile at a time
# ----------------------------------------------------------------------------------------------


def _loop_sequences(q, k, kv_start):
    qlen, n_cache = q.shape[2], k.shape[2]
    for b in range(q.shape[0]):
        s = int(kv_start[b])
        qv = min(qlen, n_cache - s)
        yield b, s, n_cache - s - qv, qlen - qv


def _loop_topk_sorted(scores, kk):
    if kk == 0:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.int64)
    if kk >= scores.shape[-1]:
        return torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
    return torch.topk(scores, kk, dim=-1, sorted=False).indices.sort(dim=-1).values


def _loop_pack(per_seq, first_tiles, q, hkv, tile, decode):
    bsz = q.shape[0]
    u_max = max(1, max(len(t) for t in per_seq))
    k_max = max([t.shape[1] for ts in per_seq for t in ts] + [1])
    indices = torch.full((bsz, hkv, u_max, k_max), -1, dtype=torch.int32)
    counts = torch.zeros(bsz, u_max, dtype=torch.int32)
    for b, ts in enumerate(per_seq):
        for u, t in enumerate(ts):
            indices[b, :, u, : t.shape[1]] = t.to(torch.int32)
            counts[b, u] = t.shape[1]
    return Selection(indices, counts, torch.tensor(first_tiles, dtype=torch.int64), tile, decode)


def _loop_build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores):
    kv_start = torch.zeros(q.shape[0], dtype=torch.int64) if kv_start is None else kv_start
    decode = q.shape[2] == 1
    per_seq, first_tiles = [], []
    for b, s, p0, i0 in _loop_sequences(q, k, kv_start):
        qb, kb = q[b, :, i0:], k[b, :, s:]
        sets = []
        if qb.shape[1] and decode:
            sc = decode_scores(qb, kb)
            sets = [_loop_topk_sorted(sc, budget(sc.shape[-1], rho, k_min))]
        elif qb.shape[1]:
            for ta, sc in prefill_scores(qb, kb, p0):
                n_before = [(ta + u) * tile for u in range(sc.shape[1])]
                ks = [budget(n, rho, k_min) for n in n_before]
                keys = torch.arange(sc.shape[-1])
                masked = sc.masked_fill(keys[None, None, :] >= torch.tensor(n_before)[None, :, None], float("-inf"))
                top = torch.topk(masked, max(ks), dim=-1, sorted=True).indices if max(ks) else None
                for u, kk in enumerate(ks):
                    sets.append(top[:, u, :kk].sort(dim=-1).values if kk else sc.new_zeros(sc.shape[0], 0,
                                                                                         dtype=torch.int64))
        per_seq.append([t + s for t in sets])
        first_tiles.append(0 if decode else p0 // tile)
    return _loop_pack(per_seq, first_tiles, q, k.shape[1], tile, decode)


def loop_pooled_selection(q, k, rho, k_min, tile, kv_start=None, pool="sum", max_chunk_bytes=DEFAULT_CHUNK_BYTES):
    sc = q.shape[-1] ** -0.5

    def decode_scores(qb, kb):
        hq, _, d = qb.shape
        hkv = kb.shape[0]
        s = torch.einsum("hgd,hnd->hgn", qb.float().view(hkv, hq // hkv, d), kb.float()) * sc
        p = torch.softmax(s, dim=-1).reshape(hq, -1)
        return p.sum(0, keepdim=True) if pool == "sum" else p.amax(0, keepdim=True)

    def prefill_scores(qb, kb, p0):
        if pool == "sum":
            for ta, pooled in pooled_tile_scores(qb, kb, p0, tile, sc, max_chunk_bytes):
                yield ta, pooled.sum(0, keepdim=True)
        else:
            kx = kb.repeat_interleave(qb.shape[0] // kb.shape[0], dim=0)
            for ta, pooled in pooled_tile_scores(qb, kx, p0, tile, sc, max_chunk_bytes):
                yield ta, pooled.amax(0, keepdim=True)

    return _loop_build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores)


def _loop_window(n, kk, sinks):
    s = min(sinks, kk)
    return torch.cat([torch.arange(s), torch.arange(n - (kk - s), n)])[None]


def loop_window_selection(q, k, rho, k_min, tile, kv_start=None, sinks=4):
    kv_start = torch.zeros(q.shape[0], dtype=torch.int64) if kv_start is None else kv_start
    decode = q.shape[2] == 1
    per_seq, first_tiles = [], []
    for b, s, p0, i0 in _loop_sequences(q, k, kv_start):
        qv = q.shape[2] - i0
        sets = []
        if qv and decode:
            n = k.shape[2] - s
            sets = [_loop_window(n, budget(n, rho, k_min), sinks)]
        elif qv:
            for t in range(p0 // tile, (p0 + qv - 1) // tile + 1):
                sets.append(_loop_window(t * tile, budget(t * tile, rho, k_min), sinks))
        per_seq.append([x + s for x in sets])
        first_tiles.append(0 if decode else p0 // tile)
    return _loop_pack(per_seq, first_tiles, q, k.shape[1], tile, decode)


def loop_page_selection(q, k, rho, k_min, tile, kv_start=None, page=16, max_chunk_bytes=DEFAULT_CHUNK_BYTES):
    sc = q.shape[-1] ** -0.5
    ub_of, ranks = selectors._upper_bound, selectors._page_rank_scores

    def decode_scores(qb, kb):
        hq, _, d = qb.shape
        hkv, n, _ = kb.shape
        lo, hi = selectors.page_bounds(kb, page)
        w = torch.softmax(ub_of(qb.float().view(hkv, hq // hkv, 1, d), lo, hi) * sc, dim=-1).sum(dim=(1, 2))
        return ranks(w, n, page)

    def prefill_scores(qb, kb, p0):
        hq, qv, d = qb.shape
        hkv, n, _ = kb.shape
        g = hq // hkv
        lo, hi = selectors.page_bounds(kb, page)
        pages = lo.shape[1]
        rows = max(tile, max_chunk_bytes // max(1, 4 * hq * max(pages, n // 8)))
        tiles_per_chunk = max(1, rows // tile)
        t_begin, t_end = p0 // tile, (p0 + qv - 1) // tile + 1
        page_start = torch.arange(pages) * page
        for ta in range(t_begin, t_end, tiles_per_chunk):
            tb = min(t_end, ta + tiles_per_chunk)
            qs, qe = max(ta * tile, p0), min(tb * tile, n)
            pos = torch.arange(qs, qe)
            ub = ub_of(qb[:, qs - p0 : qe - p0].float().view(hkv, g, qe - qs, d), lo, hi) * sc
            visible = page_start[None, :] < ((pos // tile) * tile)[:, None]
            ub.masked_fill_(~visible, float("-inf"))
            w = torch.softmax(ub, dim=-1).nan_to_num_(0.0).sum(1)
            pooled = torch.zeros(hkv, tb - ta, pages, dtype=torch.float32)
            pooled.index_add_(1, pos // tile - ta, w)
            yield ta, ranks(pooled, qe, page)

    return _loop_build(q, k, kv_start, rho, k_min, tile, decode_scores, prefill_scores)


# ----------------------------------------------------------------------------------------------
# vectorised selectors == the loops
# ----------------------------------------------------------------------------------------------

# (batch, KV heads, GQA group, keys, queries, left padding): odd lengths, decode (1 query), a prefill chunk on
# top of a cache (queries < keys), padding longer than some sequences' queries
SHAPES = [(1, 2, 1, 150, 150, False), (3, 3, 3, 301, 301, False), (2, 1, 2, 97, 1, False), (3, 2, 1, 257, 1, True),
          (3, 2, 3, 200, 77, True), (4, 3, 2, 333, 333, True), (2, 4, 1, 129, 5, False), (2, 1, 3, 513, 1, True)]
BUDGETS = [(0.1, 4), (0.3, 16), (1.0, 8)]


def _inputs(bsz, hkv, g, n, qlen, pad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(bsz, hkv * g, qlen, 16, generator=gen)
    k = 2 * torch.randn(bsz, hkv, n, 16, generator=gen)
    kv_start = torch.randint(0, n - qlen // 2 - 1, (bsz,), generator=gen) if pad else None
    if pad:
        kv_start[0] = 0  # one unpadded sequence beside padded ones
    return q, k, kv_start


def _assert_same(ours, ref):
    assert ours.decode == ref.decode and ours.tile == ref.tile
    assert torch.equal(ours.counts, ref.counts), (ours.counts, ref.counts)
    assert torch.equal(ours.first_tile, ref.first_tile), (ours.first_tile, ref.first_tile)
    assert ours.indices.dtype == ref.indices.dtype and torch.equal(ours.indices, ref.indices)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho,k_min", BUDGETS)
def test_vectorised_selectors_equal_the_loops(shape, rho, k_min):
    q, k, kv_start = _inputs(*shape)
    for pool in ("sum", "max"):
        _assert_same(selectors.pooled_selection(q, k, rho, k_min, 32, kv_start=kv_start, pool=pool),
                     loop_pooled_selection(q, k, rho, k_min, 32, kv_start=kv_start, pool=pool))
    _assert_same(selectors.window_selection(q, k, rho, k_min, 32, kv_start=kv_start),
                 loop_window_selection(q, k, rho, k_min, 32, kv_start=kv_start))
    _assert_same(selectors.page_selection(q, k, rho, k_min, 32, kv_start=kv_start, page=8),
                 loop_page_selection(q, k, rho, k_min, 32, kv_start=kv_start, page=8))


@pytest.mark.parametrize("shape", [(3, 2, 3, 301, 301, False), (3, 2, 2, 280, 100, True)])
def test_vectorised_selectors_equal_the_loops_in_small_chunks(shape):
    """Several chunks of tiles per sequence (a small max_chunk_bytes), tile 16, ties (sharp scores)."""
    q, k, kv_start = _inputs(*shape, seed=3)
    q = q * 8  # many probabilities underflow to exactly 0: ties at the end of the top-k
    for pool in ("sum", "max"):
        _assert_same(selectors.pooled_selection(q, k, 0.2, 4, 16, kv_start=kv_start, pool=pool, max_chunk_bytes=30000),
                     loop_pooled_selection(q, k, 0.2, 4, 16, kv_start=kv_start, pool=pool, max_chunk_bytes=30000))
    _assert_same(selectors.page_selection(q, k, 0.2, 4, 16, kv_start=kv_start, page=16, max_chunk_bytes=30000),
                 loop_page_selection(q, k, 0.2, 4, 16, kv_start=kv_start, page=16, max_chunk_bytes=30000))
    _assert_same(selectors.window_selection(q, k, 0.2, 4, 16, kv_start=kv_start, sinks=2),
                 loop_window_selection(q, k, 0.2, 4, 16, kv_start=kv_start, sinks=2))


def test_more_sequences_than_one_fold(monkeypatch):
    monkeypatch.setattr(selectors, "MAX_FOLD", 2)
    q, k, _ = _inputs(5, 2, 2, 140, 140, False, seed=4)
    _assert_same(selectors.pooled_selection(q, k, 0.1, 4, 32), loop_pooled_selection(q, k, 0.1, 4, 32))
    _assert_same(selectors.page_selection(q, k, 0.1, 4, 32, page=8), loop_page_selection(q, k, 0.1, 4, 32, page=8))


def test_no_host_sync_without_padding(monkeypatch):
    """Without kv_start the selectors read nothing back from the device: no .item(), .tolist() or int()."""
    q, k, _ = _inputs(3, 2, 2, 150, 150, False)

    def refuse(*a, **kw):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for qq in (q, q[:, :, -1:]):
        selectors.pooled_selection(qq, k, 0.1, 4, 32)
        selectors.pooled_selection(qq, k, 0.1, 4, 32, pool="max")
        selectors.window_selection(qq, k, 0.1, 4, 32)
        selectors.page_selection(qq, k, 0.1, 4, 32)


# ----------------------------------------------------------------------------------------------
# batched greedy decoding == one prompt at a time
# ----------------------------------------------------------------------------------------------

import argparse  # noqa: E402

from fixtures import evaltools as E  # noqa: E402
from kascade.eval import command  # noqa: E402
from kascade.eval.generation import greedy, greedy_batch  # noqa: E402
from kascade.models import TINY_MODEL_DIR, TINY_PLAN  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    model_dir = E.save_model_dir(root / "model", layers=3, max_positions=1024)
    model = E.tiny_llama(len(E.tokenizer()), layers=3, max_positions=1024)
    E.plan_for(model, anchors=(0, 2), k_min=16).save(root / "plan.json")
    return model_dir, root / "plan.json"


def _args(model_dir, plan, out, **kw):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    argv = [str(model_dir), "--plan", str(plan), "--out", str(out), "--no-coverage", "--data", str(E.ESSAY)]
    for k, v in kw.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return parser.parse_args(argv)


def _rows(out):
    return {command._key(r): {k: r[k] for k in ("score", "prediction", "target", "new_tokens")}
            for r in command.read_results(out / "results.jsonl")}


def test_batched_rows_equal_one_by_one(files, tmp_path):
    """`kascade eval --batch 4` writes the rows of --batch 1: same keys, predictions, scores (dense, kascade,
    quest; fp32 on the CPU)."""
    model_dir, plan = files
    kw = dict(tasks="niah_single,copy", lengths=300, budgets=0.1, strategies="kascade,quest", samples=4,
              max_new_tokens=10)
    assert command.run(_args(model_dir, plan, tmp_path / "one", batch=1, **kw)) == 0
    assert command.run(_args(model_dir, plan, tmp_path / "four", batch=4, **kw)) == 0
    one, four = _rows(tmp_path / "one"), _rows(tmp_path / "four")
    assert len(one) == 2 * 3 * 4 and one == four
    first = command.read_results(tmp_path / "four" / "results.jsonl")[0]
    assert set(first) == {"task", "length", "budget", "strategy", "sample", "seed", "score", "prediction", "target",
                          "new_tokens", "seconds"}


def test_rounds_and_resume_form_batches_of_what_is_left(files, tmp_path, monkeypatch):
    model_dir, plan = files
    seen = []
    real = command._run_batch
    monkeypatch.setattr(command, "_run_batch", lambda m, t, samples, p, st, a: (
        seen.append((samples[0].task, None if st is None else st.name, [s.seed for s in samples])),
        real(m, t, samples, p, st, a))[1])
    kw = dict(tasks="niah_single", lengths=256, budgets=0.1, strategies="streamingllm", max_new_tokens=4)
    assert command.run(_args(model_dir, plan, tmp_path / "o", batch=2, samples=3, **kw)) == 0
    # round 0: samples 0-1 of every cell, then round 1: sample 2
    assert seen == [("niah_single", None, [0, 1]), ("niah_single", "streamingllm", [0, 1]), ("niah_single", None, [2]),
                    ("niah_single", "streamingllm", [2])]
    seen.clear()
    assert command.run(_args(model_dir, plan, tmp_path / "o", batch=4, samples=6, **kw)) == 0
    assert seen == [("niah_single", None, [3, 4, 5]), ("niah_single", "streamingllm", [3, 4, 5])]


def test_greedy_batch_stops_per_row():
    model = E.tiny_llama(300, layers=2)
    ids = torch.randint(3, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    free = [greedy(model, ids[b : b + 1], 8) for b in range(3)]
    # an end-of-sequence id: the second row's fourth token; rows stop before their first such id
    eos = free[1][3]
    outs = greedy_batch(model, ids, [8, 8, 2], [eos])
    assert outs == [greedy(model, ids[b : b + 1], n, [eos]) for b, n in enumerate([8, 8, 2])]
    assert outs[1] == free[1][: free[1].index(eos)] and len(outs[2]) <= 2
    assert greedy_batch(model, ids, 0) == [[], [], []]
    with pytest.raises(ValueError, match="one number per row"):
        greedy_batch(model, ids, [1, 2])


def test_longbench_prompts_of_several_lengths_run_per_length(files, tmp_path, monkeypatch):
    """LongBench prompts cut to at most 100 tokens have lengths 100, 98, 78, 60, 99, 100 with the test tokenizer:
    a batch of all six runs as one batch per length, and gives the rows of one by one."""
    model_dir, plan = files
    batches = []
    real = command._run_batch
    monkeypatch.setattr(command, "_run_batch", lambda m, t, samples, p, st, a: (
        batches.append(sorted(len(x) for x in p)), real(m, t, samples, p, st, a))[1])
    kw = dict(samples=6, lengths=100, budgets=0.2, strategies="kascade", max_new_tokens=4,
              longbench=str(E.FIXTURES / "longbench_sample.jsonl"))
    assert command.run(_args(model_dir, plan, tmp_path / "lb", batch=6, **kw)) == 0
    assert sorted(batches) == sorted([[100, 100], [98], [78], [60], [99]] * 2)
    assert command.run(_args(model_dir, plan, tmp_path / "lb1", batch=1, **kw)) == 0
    assert _rows(tmp_path / "lb") == _rows(tmp_path / "lb1")


def test_prompts_made_by_workers_are_the_same(files, tmp_path):
    """--workers 1: prompts made in a worker process ahead of their batches; same rows as made in-process."""
    model_dir, plan = files
    kw = dict(tasks="niah_single,vt", lengths=256, budgets=0.1, strategies="streamingllm", samples=2, max_new_tokens=4,
              batch=2)
    assert command.run(_args(model_dir, plan, tmp_path / "here", workers=0, **kw)) == 0
    assert command.run(_args(model_dir, plan, tmp_path / "pool", workers=1, **kw)) == 0
    assert _rows(tmp_path / "here") == _rows(tmp_path / "pool") and len(_rows(tmp_path / "pool")) == 2 * 2 * 2


def test_batched_path_has_no_padding(monkeypatch):
    """The batch runs prompts of one length without an attention mask: the selectors never see kv_start (no
    per-sequence path, no host sync for it), in prefill and decode."""
    import kascade
    from kascade.eval import strategies as S

    def refuse(*a, **kw):
        raise AssertionError("kv_start reached a selector")

    monkeypatch.setattr(selectors, "resolve_kv_start", refuse)
    model = E.tiny_llama(300, layers=3)
    plan = E.plan_for(model, anchors=(0, 2), k_min=8)
    ids = torch.randint(3, 300, (3, 70), generator=torch.Generator().manual_seed(1))
    for name in ("quest", "streamingllm", "kascade-agnostic", "omnikv"):
        strategy = S.make_strategy(name, plan, model.config, 0.2, 8)
        with kascade.enable(model, strategy=strategy):
            assert len(greedy_batch(model, ids, 3)) == 3
        assert strategy.attended(1) is not None  # the sparse path ran
