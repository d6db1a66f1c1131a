"""kascade.kernels.topk_select (radix select on float bits) against a sort-based rule.

The kernel's order is fully specified, so the result is compared element for element: "levels" puts
the keys above the k-th value in ascending position, then ties at the k-th value in ascending position,
then -1; "candidates" puts first, in ascending position, the keys whose top 16 bits (bits 30..15)
exceed the k-th value's, then the other keys above the k-th value, then the ties.
CPU: Triton interpreter at small sizes; GPU (-m gpu): decode-sized rows.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from kascade.kernels.topk_select import FINISH_MAX, topk_select  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


METHODS = ["levels", "candidates"]


def expected(scores, k, start, rows_per_batch, kmax, method="levels", finish_max=None):
    out = torch.full((scores.shape[0], kmax), -1, dtype=torch.int32)
    s = scores.cpu()
    for r in range(s.shape[0]):
        b = r // rows_per_batch
        kk, st = int(k[b]), int(start[b])
        row = s[r, st:]
        thr = torch.sort(row, descending=True).values[kk - 1]
        gt = torch.nonzero(row > thr).flatten() + st
        eq = torch.nonzero(row == thr).flatten()[: kk - gt.numel()] + st
        p16 = int(thr.view(torch.int32)) >> 15
        crowded = finish_max is not None and int(((row.view(torch.int32) >> 15) == p16).sum()) > finish_max
        if method == "candidates" and not crowded:  # keys above thr's 16-bit prefix first
            high = (s[r].view(torch.int32) >> 15)[gt]
            gt = torch.cat([gt[high > p16], gt[high == p16]])
        out[r, :kk] = torch.cat([gt, eq]).to(torch.int32)
    return out


def run(scores, k, start, rows_per_batch, kmax, method="levels", finish_max=FINISH_MAX):
    k = torch.tensor(k, device=scores.device)
    start = torch.tensor(start, device=scores.device)
    got = topk_select(scores, k, start, rows_per_batch=rows_per_batch, kmax=kmax, method=method,
                      finish_max=finish_max)
    want = expected(scores, k, start, rows_per_batch, kmax, method, finish_max)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,k,start", [(3000, [300, 1], [0, 2999]), (777, [777, 5], [0, 100]), (64, [10, 64], [3, 0])])
def test_random_rows(n, k, start, method):
    g = torch.Generator().manual_seed(n)
    scores = (torch.rand(4, n, generator=g) ** 3).to(DEV)  # many exponents, distinct values
    run(scores, k, start, rows_per_batch=2, kmax=max(k) + 3, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_softmax_rows(method):
    """Rows like pooled attention: most keys share a few exponents, so the 16-bit bins are crowded."""
    g = torch.Generator().manual_seed(4)
    scores = torch.softmax(torch.randn(6, 5000, generator=g) * 2, -1).to(DEV)
    run(scores, [500, 37, 4999], [0, 1, 0], rows_per_batch=2, kmax=5000, method=method)


@pytest.mark.parametrize("finish_max", [0, 40, 10**9])
def test_crowded_rows_take_the_chunked_finish(finish_max):
    """Candidate path: rows where more than finish_max keys share the k-th value's 16-bit prefix (flat scores,
    as near-uniform attention gives) are finished over the whole row, chunked, in the levels order; the other
    rows of the same call keep the candidate order. 0: every row crowded; 10**9: none."""
    g = torch.Generator().manual_seed(12)
    n = 3000
    scores = (torch.rand(4, n, generator=g) ** 3)
    scores[1] = 1.0 / n + torch.rand(n, generator=g) * 1e-9  # one 16-bit bin: every key a candidate
    scores[2, :] = 0.5  # constant: every key a candidate and a tie
    scores[3] = torch.softmax(torch.randn(n, generator=g) * 1e-3, -1)  # near-uniform attention
    run(scores.to(DEV), [300, 900, 1000, 2999], [0, 7, 0, 1], rows_per_batch=1, kmax=3000, method="candidates",
        finish_max=finish_max)


@pytest.mark.parametrize("finish_max", [0, 10**9])
def test_rows_whose_candidates_all_tie_are_finished_by_copying_them(finish_max):
    """Candidate path: when every key sharing the k-th value's 16-bit prefix holds that same value (constant rows,
    vLLM's dummy weights), the split pass's bookkeeping says so (the two TIE_SLOT maxima sum to 0x7FFF) and the
    finish copies the first ties instead of walking them, crowded or not; rows with distinct candidates do not
    qualify. Same result as the sort rule (levels and candidate orders coincide on such rows)."""
    from kascade.kernels import topk_select as ts

    n = 3000
    g = torch.Generator().manual_seed(13)
    scores = torch.full((4, n), 0.25)
    scores[0, ::7] = 0.5  # 429 keys above the tied candidates; k reaches into the ties
    scores[2] = (torch.rand(n, generator=g) ** 3)  # distinct candidates
    scores[3, :] = 0.0  # every key zero: tied, with low bits 0
    scores = scores.to(DEV)
    k, start = [1000, 2999, 300, 17], [0, 1, 0, 5]
    run(scores, k, start, rows_per_batch=1, kmax=3000, method="candidates", finish_max=finish_max)
    kb = torch.tensor(k, dtype=torch.int32, device=DEV)
    sb = torch.tensor(start, dtype=torch.int32, device=DEV)
    nchunk, chunk = ts.plan_chunks(4, n, scores.device)
    ws = ts.RadixWorkspace(4, nchunk, scores.device)
    ws.hist.zero_()
    ts._radix_hist_kernel[(4, nchunk)](scores, ws.hist, kb, sb, sb, n, scores.stride(0), chunk, 1, LEVEL=1,
                                       BLOCK=ts.BLOCK_SEL, HAS_END=False, num_warps=4)
    out = torch.empty(4, 3000, dtype=torch.int32, device=DEV)
    ts.radix_candidates(scores, n, ws, kb, sb, 1, nchunk, chunk, out, finish_max=finish_max)
    tie = ws.hist.view(4, 1024)[:, ts.TIE_SLOT:ts.TIE_SLOT + 2].sum(1).cpu()
    assert tie.tolist()[:2] == [0x7FFF, 0x7FFF] and tie[3] == 0x7FFF and tie[2] > 0x7FFF


def test_method_error():
    with pytest.raises(ValueError, match="method"):
        topk_select(torch.rand(2, 64, device=DEV), torch.tensor([3, 3], device=DEV), method="sort")


@pytest.mark.parametrize("method", METHODS)
def test_ties_take_smallest_positions(method):
    n = 2500
    scores = torch.full((4, n), 0.25)
    scores[1, ::7] = 0.5  # 358 keys above, k inside them
    scores[2, ::7] = 0.5  # k reaches into the ties
    scores[3] = torch.rand(n) * 1e-3
    scores[3, 100:2000] = 1e-38  # denormal-free tiny ties
    run(scores.to(DEV), [100, 100, 1000, 2450], [0, 11, 0, 30], rows_per_batch=1, kmax=2450, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_zeros_and_exact_bins(method):
    """Scores that share 24 high bits and differ in the last 7 (the per-chunk level) and exact zeros."""
    n = 1500
    base = torch.tensor(0.123456789).view(torch.int32) & ~127
    bits = base + torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    scores = bits.view(torch.float32).clone()
    scores[1, 500:] = 0.0
    run(scores.to(DEV), [700, 1200], [0, 0], rows_per_batch=1, kmax=1200, method=method)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_gpu_decode_sized_rows(method):
    torch.manual_seed(0)
    n = 131072
    scores = torch.softmax(torch.randn(16, n, device="cuda") * 3, -1)
    run(scores, [13107, 1, 131072 - 5, 999], [0, 5, 5, 70000], rows_per_batch=4, kmax=131072, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_per_entry_end(method):
    """end[b] bounds each entry's keys (a preallocated cache); keys at or after it are never taken."""
    g = torch.Generator().manual_seed(9)
    scores = (torch.rand(4, 2500, generator=g) ** 3).to(DEV)
    scores[0:2, 1500:] = 10.0  # larger than every valid score: must not be selected
    k, start, end = [200, 7], [0, 1000], [1500, 2500]
    got = topk_select(scores, torch.tensor(k, device=DEV), torch.tensor(start, device=DEV), rows_per_batch=2,
                      kmax=210, end=torch.tensor(end, device=DEV), method=method)
    cut = scores.clone()
    cut[0:2, 1500:] = -1.0  # below every valid score: the sort-based rule never reaches them
    assert torch.equal(got.cpu(), expected(cut, k, start, 2, 210, method))


def test_flat_attention_benchmark_starts_without_a_gpu():
    """benchmarks/flat_topk.py (GPU only) imports and explains itself on a machine without one."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "flat_topk.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "finish" in out.stdout, out.stderr
