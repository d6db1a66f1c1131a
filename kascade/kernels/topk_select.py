"""Exact top-k of long rows of non-negative float32 scores by radix select on the float bits.

For x >= 0 the int32 bit pattern of a float32 orders like the value, so the k-th largest score is
found digit by digit, most significant first, from histograms of the bits instead of a sort:

    level 1: bits 30..23 (the exponent), 256 bins, over the whole row
    level 2: bits 22..15, 256 bins, over the keys whose bits 30..23 equal the chosen bin
    level 3: bits 14..7,  256 bins, likewise
    level 4: bits 6..0,   128 bins, also kept per chunk of the row (as suffix sums)
    compact: the keys above the threshold T, then the ties at T in ascending position, until k

Each level walks its histogram from the top: the chosen bin is the highest one whose suffix
count reaches the number of keys still wanted. Every program recomputes that walk from the
small histograms of the levels before it, so no kernel waits on another inside a launch and no
value goes back to the host (the whole select can be captured in a CUDA graph).

Rows are processed by (row, chunk) programs: every level adds its chunk histogram into one row
histogram with atomics (counts, so the order of the additions does not matter); level 4 also
stores per chunk the suffix sums of its histogram, from which the compaction reads two columns
to get each chunk's write offsets,
so the result is deterministic: slots [0, k - r) hold the keys above T in ascending position,
slots [k - r, k) the r ties at T with the smallest positions.

Candidate path (`radix_candidates`, used by the decode anchor): after level 2 the keys whose top 16
bits exceed the threshold's are certainly kept and those equal to them are the only candidates, usually
a few hundred keys, of which w are still wanted. One pass over the row writes the first kind straight
to the output (ascending position, slots [0, k - w)) and the candidates to a scratch row; one program
per row then finishes levels 3-4 and the compaction over the candidates alone (slots [k - w, k): those
above T ascending, then the ties at T ascending). This replaces two histogram passes and the compaction over every
key by one pass. A row with more than `finish_max` candidates (nearly flat scores: constant ones, or
the near-uniform attention of a model with tiny random weights, where one program would walk most of a
128K row three times) is finished instead by levels 3-4 and the compaction over the whole row, chunked
like the levels path (its slots then in the levels order); every program of either finish reads the
candidate count from the level-2 histogram and leaves the other kind of row alone, so no value goes back
to the host. A row whose candidates all hold the same score (exact ties: constant scores, or a model whose
tiny weights round every logit to the same value) needs no level 3-4 walk at all: the split pass also
records the largest low 15 bits of its candidates and the largest complement (two atomics per program),
and where they show every candidate equal, the single finish copies the first w candidates, crowded or not.

Row r belongs to batch entry r // rows_per_batch; its valid keys are [start[b], end[b]) (end[b] = N
unless a per-entry end is given: a preallocated cache) and it keeps k[b] of them
(k[b] <= end[b] - start[b]). Positions are written as absolute column numbers, int32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (Hopper+): griddepcontrol.launch_dependents / .wait
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch, gdc_wait as _gdc_wait
    from triton.backends.nvidia.compiler import CUDAOptions as _CUDAOptions

    _HAS_PDL = "launch_pdl" in getattr(_CUDAOptions, "__dataclass_fields__", {})
except ImportError:  # a Triton without it: the stubs are never traced (PDL is then always False)
    _HAS_PDL = False

    @triton.jit
    def _gdc_launch():
        pass

    @triton.jit
    def _gdc_wait():
        pass

# The per-row histograms of levels 1-4 live in one [R, 4, 256] int32 buffer (level 4 uses 128 bins).
HIST_BINS = 256
LAST_BINS = 128
BLOCK_SEL = 1024  # keys per step of the select kernels; chunks are multiples of it
FINISH_MAX = 4 * BLOCK_SEL  # candidate path: rows with more candidates take the chunked finish
# candidate path: two int32 of a row's histogram that level 4 leaves unused (its 128 bins end at 3 * 256 + 128):
# the largest low 15 bits of the row's candidates and the largest 0x7FFF minus them (zero-initialised like the
# histograms); they sum to 0x7FFF exactly when every candidate holds the same score (an exactly tied row)
TIE_SLOT = tl.constexpr(3 * HIST_BINS + LAST_BINS)
LOW_BITS = tl.constexpr(0x7FFF)
MAX_CHUNKS = 64  # chunks per row (plan_chunks): the compaction kernels read the chunk counts through this range


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def pdl_available(device) -> bool:
    """Programmatic dependent launch: a CUDA device of compute capability >= 9, a Triton that has it, and
    not the interpreter (which has no grid dependency control)."""
    return (_HAS_PDL and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_kwargs(pdl: int) -> dict:
    """Launch options of a kernel started by programmatic dependent launch (none without it)."""
    return {"launch_pdl": True} if pdl else {}


PDL_MODES = {"off": 0, "start": 1, "exit": 2}  # the PDL constexpr of the kernels, by name


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of a kernel launched with programmatic dependent launch (PDL 1 or 2, PDL_MODES).

    PDL 1 ("start"): let the next kernel's programs launch at once, then wait; PDL 2 ("exit"): only
    wait, so the next kernel launches as this one's programs exit (its launch overlaps the last
    programs and the memory flush). Either way every program waits until the previous kernel has
    finished and its writes are visible, so each kernel still ends after the one before it (reads of
    any earlier kernel's output stay safe). PDL 0: nothing."""
    if PDL == 1:
        _gdc_launch()
    if PDL != 0:
        _gdc_wait()


@triton.jit
def _descend(h, want, NB: tl.constexpr):
    """Highest bin d of histogram h [NB] with sum(h[d:]) >= want; returns (d, want - sum(h[d+1:]))."""
    bins = tl.arange(0, NB)
    suffix = tl.sum(h, 0) - tl.cumsum(h, 0) + h
    d = tl.max(tl.where(suffix >= want, bins, 0), 0)
    above = tl.sum(tl.where(bins > d, h, 0), 0)
    return d, want - above


@triton.jit
def _prefix(H_row, want, LEVELS: tl.constexpr):
    """Walk the first LEVELS row histograms: (prefix of the k-th key, keys still wanted inside it).

    The prefix has 8 * LEVELS bits: bits 30..(31 - 8 * LEVELS) of the threshold key.
    """
    bins = tl.arange(0, 256)
    d, want = _descend(tl.load(H_row + bins), want, 256)
    prefix = d
    if LEVELS >= 2:
        d, want = _descend(tl.load(H_row + 256 + bins), want, 256)
        prefix = prefix * 256 + d
    if LEVELS >= 3:
        d, want = _descend(tl.load(H_row + 512 + bins), want, 256)
        prefix = prefix * 256 + d
    return prefix, want


@triton.jit
def _keys(s_row, n0, hi, BLOCK: tl.constexpr):
    """int32 bit patterns of the scores [n0, n0 + BLOCK) of a row (0 from hi on)."""
    offs = n0 + tl.arange(0, BLOCK)
    return tl.load(s_row + offs, mask=offs < hi, other=0.0).to(tl.int32, bitcast=True)


@triton.jit
def _candidates(c_row, s_row, j0, m, BLOCK: tl.constexpr):
    """Candidates [j0, j0 + BLOCK) of a row's m: (positions, int32 keys, valid mask)."""
    offs = j0 + tl.arange(0, BLOCK)
    valid = offs < m
    pos = tl.load(c_row + offs, mask=valid, other=0)
    key = tl.load(s_row + pos, mask=valid, other=0.0).to(tl.int32, bitcast=True)
    return pos, key, valid


@triton.jit
def _chunk_bounds(c, CHUNK, start, N, END, b, HAS_END: tl.constexpr):
    """Keys [lo, hi) of chunk c: inside [start, end) with end = END[b] (HAS_END) or N."""
    if HAS_END:
        end = tl.load(END + b)
    else:
        end = N
    lo = tl.maximum(c * CHUNK, start)
    hi = tl.minimum(c * CHUNK + CHUNK, end)
    return lo, hi


@triton.jit
def _candidate_count(H_row, kk):
    """Keys of a row sharing the k-th largest key's 16-bit prefix (levels 1-2 of H_row filled)."""
    prefix1, want = _prefix(H_row, kk, 1)
    bins = tl.arange(0, 256)
    h2 = tl.load(H_row + 256 + bins)
    d2, want = _descend(h2, want, 256)
    return tl.sum(tl.where(bins == d2, h2, 0), 0)


@triton.jit
def _candidates_tied(H_row):
    """Whether every candidate of the row holds the same score (the split pass's TIE_SLOT maxima; needs m > 0)."""
    return tl.load(H_row + TIE_SLOT) + tl.load(H_row + TIE_SLOT + 1) == LOW_BITS


@triton.jit
def _crowded_only(H_row, kk, lo, hi, FINISH_MAX, FALLBACK: tl.constexpr):
    """A chunk's end hi; with FALLBACK, lo (nothing to do) for a row of at most FINISH_MAX candidates or of
    candidates that all tie, which the single-program finish took."""
    if FALLBACK:
        hi = tl.where((_candidate_count(H_row, kk) <= FINISH_MAX) | _candidates_tied(H_row), lo, hi)
    return hi


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "CHUNK", "FINISH_MAX", "ROWS_PER_B"])
def _radix_hist_kernel(S, H, KB, START, END, N, stride_s, CHUNK, ROWS_PER_B,
                       LEVEL: tl.constexpr, BLOCK: tl.constexpr, HAS_END: tl.constexpr, FINISH_MAX=0,
                       FALLBACK: tl.constexpr = False, PDL: tl.constexpr = 0):
    """Levels 1-3: add this chunk's histogram of the level's digit into H[row, LEVEL - 1].
    FALLBACK: only rows with more than FINISH_MAX candidates (the candidate path's chunked finish).
    PDL: started by programmatic dependent launch (pdl_start)."""
    pdl_start(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // ROWS_PER_B
    want = tl.load(KB + b)
    start = tl.load(START + b)
    H_row = H + row * 1024
    lo, hi = _chunk_bounds(c, CHUNK, start, N, END, b, HAS_END)
    hi = _crowded_only(H_row, want, lo, hi, FINISH_MAX, FALLBACK)
    prefix = 0
    if LEVEL >= 2:
        prefix, want = _prefix(H_row, want, LEVEL - 1)
    s_row = S + row.to(tl.int64) * stride_s
    acc = tl.zeros([256], dtype=tl.int32)
    for n0 in range(lo, hi, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        valid = offs < hi
        key = _keys(s_row, n0, hi, BLOCK)
        if LEVEL == 1:
            acc += tl.histogram((key >> 23) & 255, 256, mask=valid)
        elif LEVEL == 2:
            acc += tl.histogram((key >> 15) & 255, 256, mask=valid & ((key >> 23) == prefix))
        else:
            acc += tl.histogram((key >> 7) & 255, 256, mask=valid & ((key >> 15) == prefix))
    bins = tl.arange(0, 256)
    tl.atomic_add(H_row + (LEVEL - 1) * 256 + bins, acc, mask=acc > 0, sem="relaxed")


@triton.jit(do_not_specialize=["N", "CHUNK", "FINISH_MAX", "NCHUNK", "ROWS_PER_B"])  # NCHUNK (set by the rows) only addresses
def _radix_last_kernel(S, H, H4S, GT, KB, START, END, N, stride_s, CHUNK, ROWS_PER_B,
                       NCHUNK, BLOCK: tl.constexpr, HAS_END: tl.constexpr, LEVEL: tl.constexpr = 4,
                       PREFETCH: tl.constexpr = False, PDL: tl.constexpr = 0, FINISH_MAX=0,
                       FALLBACK: tl.constexpr = False):
    """A level whose chunk counts are kept: LEVEL 4 (bits 6..0, 128 bins, prefix of levels 1-3) or
    LEVEL 2 (bits 22..15, 256 bins, prefix of level 1; the candidate path).

    Adds the chunk histogram into H[row, LEVEL - 1]; stores per chunk its suffix sums
    H4S[row, c, d] = count of digits >= d and GT[row, c] = keys of the chunk above the prefix.
    PREFETCH: the chunk's first keys are requested before the prefix walk, and each block's keys one
    block ahead (register double buffering). FALLBACK as in _radix_hist_kernel.
    """
    NB: tl.constexpr = 128 if LEVEL == 4 else 256
    SHIFT: tl.constexpr = 0 if LEVEL == 4 else 15
    pdl_start(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // ROWS_PER_B
    want = tl.load(KB + b)
    start = tl.load(START + b)
    H_row = H + row * 1024
    lo, hi = _chunk_bounds(c, CHUNK, start, N, END, b, HAS_END)
    hi = _crowded_only(H_row, want, lo, hi, FINISH_MAX, FALLBACK)
    s_row = S + row.to(tl.int64) * stride_s
    if PREFETCH:
        key_next = _keys(s_row, lo, hi, BLOCK)
    prefix, want = _prefix(H_row, want, LEVEL - 1)
    acc = tl.zeros([NB], dtype=tl.int32)
    gt = tl.zeros([BLOCK], dtype=tl.int32)
    for n0 in range(lo, hi, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        valid = offs < hi
        if PREFETCH:
            key = key_next
            key_next = _keys(s_row, n0 + BLOCK, hi, BLOCK)
        else:
            key = _keys(s_row, n0, hi, BLOCK)
        high = key >> (SHIFT + (7 if LEVEL == 4 else 8))
        acc += tl.histogram((key >> SHIFT) & (NB - 1), NB, mask=valid & (high == prefix))
        gt += (valid & (high > prefix)).to(tl.int32)
    bins = tl.arange(0, NB)
    tl.atomic_add(H_row + (LEVEL - 1) * 256 + bins, acc, mask=acc > 0, sem="relaxed")
    tl.store(H4S + (row * NCHUNK + c) * NB + bins, tl.sum(acc, 0) - tl.cumsum(acc, 0) + acc)
    tl.store(GT + row * NCHUNK + c, tl.sum(gt, 0))


@triton.jit
def _compact_setup(H_row, H4S_row, GT_row, c, kk, NCHUNK, CPAD: tl.constexpr, LEVEL: tl.constexpr = 4):
    """Threshold, wanted ties and this chunk's first slots, from the counted level LEVEL (4, or 2).

    LEVEL 4: T is the full key of the k-th largest; r ties at T are wanted. LEVEL 2: T is the 16-bit
    prefix (bits 30..15) of the k-th largest, and the r "ties" are the keys still wanted among the
    candidates with that prefix. Returns (T, r, gt_base, eq_base, gt_total); gt_total == k - r keys
    lie above T (above the prefix, for LEVEL 2) and eq_base counts the chunks' keys equal to T before c.
    The NCHUNK <= CPAD chunks' counts are read through the constexpr range CPAD.
    """
    NB: tl.constexpr = 128 if LEVEL == 4 else 256
    prefix, want = _prefix(H_row, kk, LEVEL - 1)
    d, r = _descend(tl.load(H_row + (LEVEL - 1) * 256 + tl.arange(0, NB)), want, NB)
    thr = prefix * NB + d
    cidx = tl.arange(0, CPAD)
    cm = cidx < NCHUNK
    at = tl.load(H4S_row + cidx * NB + d, mask=cm, other=0)  # keys of each chunk with digit >= d
    above = tl.load(H4S_row + cidx * NB + tl.minimum(d + 1, NB - 1), mask=cm, other=0)  # digit > d (none when d
    above = tl.where(d < NB - 1, above, 0)                                                # is the top bin)
    gt_c = tl.load(GT_row + cidx, mask=cm, other=0) + above
    eq_c = at - above
    gt_base = tl.sum(tl.where(cidx < c, gt_c, 0), 0)
    eq_base = tl.sum(tl.where(cidx < c, eq_c, 0), 0)
    return thr, r, gt_base, eq_base, tl.sum(gt_c, 0)


@triton.jit
def _compact_block(key, offs, valid, thr, r, gt_base, eq_base, gt_total):
    """Slots of one block of keys: (selected mask, slot, keys above T in it, ties in it)."""
    gt = (valid & (key > thr)).to(tl.int32)
    eq = (valid & (key == thr)).to(tl.int32)
    eq_rank = eq_base + tl.cumsum(eq, 0) - eq
    take = (gt != 0) | ((eq != 0) & (eq_rank < r))
    slot = tl.where(gt != 0, gt_base + tl.cumsum(gt, 0) - gt, gt_total + eq_rank)
    return take, slot, tl.sum(gt, 0), tl.sum(eq, 0)


@triton.jit(do_not_specialize=["N", "CHUNK", "KMAX", "FINISH_MAX", "NCHUNK", "ROWS_PER_B"])
def _radix_compact_kernel(S, H, H4S, GT, KB, START, END, IDX, N, stride_s, stride_i, CHUNK, ROWS_PER_B, KMAX,
                          NCHUNK, BLOCK: tl.constexpr, HAS_END: tl.constexpr, FINISH_MAX=0,
                          FALLBACK: tl.constexpr = False, CPAD: tl.constexpr = MAX_CHUNKS, PDL: tl.constexpr = 0):
    """Write the positions of the k largest keys of the row (see the module docstring for the order).
    FALLBACK and PDL as in _radix_hist_kernel."""
    pdl_start(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // ROWS_PER_B
    kk = tl.load(KB + b)
    start = tl.load(START + b)
    thr, r, gt_base, eq_base, gt_total = _compact_setup(H + row * 1024, H4S + row * NCHUNK * 128, GT + row * NCHUNK,
                                                        c, kk, NCHUNK, CPAD)
    lo, hi = _chunk_bounds(c, CHUNK, start, N, END, b, HAS_END)
    hi = _crowded_only(H + row * 1024, kk, lo, hi, FINISH_MAX, FALLBACK)
    s_row = S + row.to(tl.int64) * stride_s
    i_row = IDX + row.to(tl.int64) * stride_i
    for n0 in range(lo, hi, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        valid = offs < hi
        key = _keys(s_row, n0, hi, BLOCK)
        take, slot, n_gt, n_eq = _compact_block(key, offs, valid, thr, r, gt_base, eq_base, gt_total)
        tl.store(i_row + slot, offs, mask=take)
        gt_base += n_gt
        eq_base += n_eq
    if c == NCHUNK - 1:  # padding slots [k, KMAX) get -1
        for j0 in range(kk, KMAX, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            tl.store(i_row + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < KMAX)


@triton.jit(do_not_specialize=["N", "CHUNK", "KMAX", "NCHUNK", "ROWS_PER_B"])
def _radix_split_kernel(S, H, H2S, GT, KB, START, END, IDX, CAND, N, stride_s, stride_i, stride_c, CHUNK, ROWS_PER_B,
                        KMAX, NCHUNK, BLOCK: tl.constexpr, HAS_END: tl.constexpr,
                        PREFETCH: tl.constexpr = False, PDL: tl.constexpr = 0, CPAD: tl.constexpr = MAX_CHUNKS):
    """Candidate path: keys above the threshold's 16-bit prefix go to IDX slots [0, k - w) in ascending
    position (w: keys still wanted among the candidates); keys with that prefix (the candidates) go to
    CAND[row, :count] in ascending position, and the TIE_SLOT maxima of their low bits to H[row].
    PREFETCH as in _radix_last_kernel.
    PDL: launched by programmatic dependent launch (pdl_start)."""
    pdl_start(PDL)
    row = tl.program_id(0)
    c = tl.program_id(1)
    b = row // ROWS_PER_B
    kk = tl.load(KB + b)
    start = tl.load(START + b)
    lo, hi = _chunk_bounds(c, CHUNK, start, N, END, b, HAS_END)
    s_row = S + row.to(tl.int64) * stride_s
    if PREFETCH:
        key_next = _keys(s_row, lo, hi, BLOCK)
    p16, r, gt_base, eq_base, gt_total = _compact_setup(H + row * 1024, H2S + row * NCHUNK * 256, GT + row * NCHUNK,
                                                        c, kk, NCHUNK, CPAD, 2)
    i_row = IDX + row.to(tl.int64) * stride_i
    c_row = CAND + row.to(tl.int64) * stride_c
    low_max = 0  # over this chunk's candidates: the largest low 15 bits, and the largest LOW_BITS minus them
    low_inv = 0
    for n0 in range(lo, hi, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        valid = offs < hi
        if PREFETCH:
            key = key_next
            key_next = _keys(s_row, n0 + BLOCK, hi, BLOCK)
        else:
            key = _keys(s_row, n0, hi, BLOCK)
        high = key >> 15
        gt = (valid & (high > p16)).to(tl.int32)
        eq = (valid & (high == p16)).to(tl.int32)
        tl.store(i_row + gt_base + tl.cumsum(gt, 0) - gt, offs, mask=gt != 0)
        tl.store(c_row + eq_base + tl.cumsum(eq, 0) - eq, offs, mask=eq != 0)
        gt_base += tl.sum(gt, 0)
        eq_base += tl.sum(eq, 0)
        low = tl.where(eq != 0, key & LOW_BITS, -1)  # -1: not a candidate
        low_max = tl.maximum(low_max, tl.max(low, 0))
        low_inv = tl.maximum(low_inv, tl.max(tl.where(low >= 0, LOW_BITS - low, 0), 0))
    H_row = H + row * 1024
    tl.atomic_max(H_row + TIE_SLOT, low_max, mask=low_max > 0, sem="relaxed")
    tl.atomic_max(H_row + TIE_SLOT + 1, low_inv, mask=low_inv > 0, sem="relaxed")


@triton.jit
def _finish_row(H_row, kk, s_row, c_row, i_row, KMAX, FINISH_MAX, BLOCK: tl.constexpr):
    """Levels 3-4 over a row's candidates, then their slots [k - w, k), and -1 in [k, KMAX); a row whose
    candidates all tie copies the first w instead; nothing for a row of more than FINISH_MAX candidates that do
    not all tie (the chunked finish takes it)."""
    prefix1, want = _prefix(H_row, kk, 1)
    bins = tl.arange(0, 256)
    h2 = tl.load(H_row + 256 + bins)
    d2, want = _descend(h2, want, 256)
    m = tl.sum(tl.where(bins == d2, h2, 0), 0)  # candidates
    if _candidates_tied(H_row) & (m > 0):
        # every candidate holds the k-th score: the first `want` of them (ascending) are its ties, slots
        # [k - want, k); no level 3-4 walk (the rows of vLLM's dummy weights, where every score ties)
        for j0 in range(0, want, BLOCK):
            offs = j0 + tl.arange(0, BLOCK)
            keep = offs < want
            tl.store(i_row + kk - want + offs, tl.load(c_row + offs, mask=keep, other=0), mask=keep)
        m = 0 * m
    else:
        m = tl.where(m <= FINISH_MAX, m, 0)  # a crowded row: no walk, and its slots are left to the chunked finish
        kk = tl.where(m > 0, kk, KMAX)
    above16 = kk - want  # keys above the 16-bit prefix: slots [0, above16) are written
    # The first BLOCK candidates (usually all of them) are read once and kept in registers for the
    # three walks; further blocks are read again by each walk.
    pos0, key0, valid0 = _candidates(c_row, s_row, 0, m, BLOCK)
    h3 = tl.histogram((key0 >> 7) & 255, 256, mask=valid0)
    for j0 in range(BLOCK, m, BLOCK):
        pos, key, valid = _candidates(c_row, s_row, j0, m, BLOCK)
        h3 += tl.histogram((key >> 7) & 255, 256, mask=valid)
    d3, want = _descend(h3, want, 256)
    h4 = tl.histogram(key0 & 127, 128, mask=valid0 & (((key0 >> 7) & 255) == d3))
    for j0 in range(BLOCK, m, BLOCK):
        pos, key, valid = _candidates(c_row, s_row, j0, m, BLOCK)
        h4 += tl.histogram(key & 127, 128, mask=valid & (((key >> 7) & 255) == d3))
    d4, r = _descend(h4, want, 128)
    thr = ((prefix1 * 256 + d2) * 256 + d3) * 128 + d4
    take, slot, n_gt, n_eq = _compact_block(key0, pos0, valid0, thr, r, above16, 0, kk - r)
    tl.store(i_row + slot, pos0, mask=take)
    gt_base = above16 + n_gt
    eq_base = n_eq
    for j0 in range(BLOCK, m, BLOCK):
        pos, key, valid = _candidates(c_row, s_row, j0, m, BLOCK)
        take, slot, n_gt, n_eq = _compact_block(key, pos, valid, thr, r, gt_base, eq_base, kk - r)
        tl.store(i_row + slot, pos, mask=take)
        gt_base += n_gt
        eq_base += n_eq
    for j0 in range(kk, KMAX, BLOCK):  # padding slots [k, KMAX) get -1
        offs = j0 + tl.arange(0, BLOCK)
        tl.store(i_row + offs, tl.full([BLOCK], -1, tl.int32), mask=offs < KMAX)


@triton.jit(do_not_specialize=["KMAX", "FINISH_MAX", "ROWS_PER_B"])
def _radix_finish_kernel(S, H, KB, IDX, CAND, stride_s, stride_i, stride_c, ROWS_PER_B, KMAX, FINISH_MAX,
                         BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    """Candidate path, one program per row of at most FINISH_MAX candidates: levels 3-4 over the candidates,
    then their slots [k - w, k)."""
    pdl_start(PDL)
    row = tl.program_id(0)
    b = row // ROWS_PER_B
    _finish_row(H + row * 1024, tl.load(KB + b), S + row.to(tl.int64) * stride_s, CAND + row.to(tl.int64) * stride_c,
                IDX + row.to(tl.int64) * stride_i, KMAX, FINISH_MAX, BLOCK)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def plan_chunks(rows: int, n: int, device, per_sm: int = 4, block: int = BLOCK_SEL):
    """(number of chunks per row, chunk length): about per_sm programs per SM, chunks of whole blocks.

    The number of chunks depends on the rows only (a run-time argument of the kernels: every batch size shares
    one compiled variant); chunks past a short row are empty programs.
    """
    nchunk = max(1, min(MAX_CHUNKS, _pow2_at_least(triton.cdiv(per_sm * num_sms(device), max(1, rows)))))
    chunk = triton.cdiv(triton.cdiv(n, nchunk), block) * block
    return nchunk, chunk


class RadixWorkspace:
    """Scratch of one radix select over R rows: level 1-4 row histograms, level-4 per-chunk counts."""

    def __init__(self, rows: int, nchunk: int, device):
        self.hist = torch.empty(rows, 4, HIST_BINS, dtype=torch.int32, device=device)  # level 4: first 128
        self.h4 = torch.empty(rows, nchunk, LAST_BINS, dtype=torch.int32, device=device)  # suffix sums
        self.gt = torch.empty(rows, nchunk, dtype=torch.int32, device=device)


def radix_levels(scores, n_keys, ws, k_b, start_b, rows_per_b, nchunk, chunk, out, first_level=1, end_b=None):
    """Levels first_level..4 and the compaction over scores [R, >= n_keys] (row stride scores.stride(0)).

    ws.hist must hold zeros (a fused kernel may have filled level 1); out [R, KMAX] int32 receives
    the positions. end_b [R // rows_per_b] int32 (optional): per-entry end of the valid keys
    (default n_keys for every row).
    """
    rows = scores.shape[0]
    grid = (rows, nchunk)
    has_end = end_b is not None
    end = end_b if has_end else start_b
    for level in range(first_level, 4):
        _radix_hist_kernel[grid](scores, ws.hist, k_b, start_b, end, n_keys, scores.stride(0), chunk, rows_per_b,
                                 LEVEL=level, BLOCK=BLOCK_SEL, HAS_END=has_end, num_warps=4)
    _radix_last_kernel[grid](scores, ws.hist, ws.h4, ws.gt, k_b, start_b, end, n_keys, scores.stride(0), chunk,
                             rows_per_b, NCHUNK=nchunk, BLOCK=BLOCK_SEL, HAS_END=has_end, num_warps=4)
    _radix_compact_kernel[grid](scores, ws.hist, ws.h4, ws.gt, k_b, start_b, end, out, n_keys, scores.stride(0),
                                out.stride(0), chunk, rows_per_b, out.shape[1], NCHUNK=nchunk, BLOCK=BLOCK_SEL,
                                HAS_END=has_end, num_warps=4)
    return out


def radix_candidates(scores, n_keys, ws, k_b, start_b, rows_per_b, nchunk, chunk, out, end_b=None,
                     prefetch: bool = True, pdl: int = 0, finish_max: int = FINISH_MAX):
    """Levels 2-4 and the compaction by the candidate path (module docstring), level 1 already in ws.hist
    (levels 3-4 of ws.hist zero).

    Same arguments and the same selected set as radix_levels(first_level=2); slot order as the module
    docstring says. Scratch: the candidate positions, [R, n_keys] int32. prefetch: the level-2 and
    split passes request each block of scores one block ahead (same result). pdl: PDL_MODES value of
    the launches (pdl_start; only where pdl_available). finish_max: rows with more candidates are
    finished by the chunked levels 3-4 and compaction (their slots in the levels order), except rows whose
    candidates all tie, which the single finish copies (the same slots in either order).
    """
    rows = scores.shape[0]
    grid = (rows, nchunk)
    has_end = end_b is not None
    end = end_b if has_end else start_b
    h2 = torch.empty(rows, nchunk, HIST_BINS, dtype=torch.int32, device=scores.device)
    cand = torch.empty(rows, max(1, n_keys), dtype=torch.int32, device=scores.device)
    _radix_last_kernel[grid](scores, ws.hist, h2, ws.gt, k_b, start_b, end, n_keys, scores.stride(0), chunk,
                             rows_per_b, NCHUNK=nchunk, BLOCK=BLOCK_SEL, HAS_END=has_end, LEVEL=2,
                             PREFETCH=prefetch, PDL=pdl, num_warps=4, **pdl_kwargs(pdl))
    _radix_split_kernel[grid](scores, ws.hist, h2, ws.gt, k_b, start_b, end, out, cand, n_keys, scores.stride(0),
                              out.stride(0), cand.stride(0), chunk, rows_per_b, out.shape[1], NCHUNK=nchunk,
                              BLOCK=BLOCK_SEL, HAS_END=has_end, PREFETCH=prefetch, PDL=pdl,
                              num_warps=4, **pdl_kwargs(pdl))
    _radix_finish_kernel[(rows,)](scores, ws.hist, k_b, out, cand, scores.stride(0), out.stride(0),
                                  cand.stride(0), rows_per_b, out.shape[1], finish_max, BLOCK=BLOCK_SEL, PDL=pdl,
                                  num_warps=8, **pdl_kwargs(pdl))
    if finish_max >= n_keys:  # no row can hold more candidates than keys: no chunked finish to launch
        return out
    # rows of more than finish_max candidates: levels 3-4 and the compaction over the whole row, chunked (with
    # PDL like the launches before them: on rows that need no chunked finish their programs only exit)
    fallback = dict(FINISH_MAX=finish_max, FALLBACK=True, HAS_END=has_end, BLOCK=BLOCK_SEL, PDL=pdl, num_warps=4,
                    **pdl_kwargs(pdl))
    _radix_hist_kernel[grid](scores, ws.hist, k_b, start_b, end, n_keys, scores.stride(0), chunk, rows_per_b,
                             LEVEL=3, **fallback)
    _radix_last_kernel[grid](scores, ws.hist, ws.h4, ws.gt, k_b, start_b, end, n_keys, scores.stride(0), chunk,
                             rows_per_b, NCHUNK=nchunk, **fallback)
    _radix_compact_kernel[grid](scores, ws.hist, ws.h4, ws.gt, k_b, start_b, end, out, n_keys, scores.stride(0),
                                out.stride(0), chunk, rows_per_b, out.shape[1], NCHUNK=nchunk, **fallback)
    return out


def topk_select(scores: torch.Tensor, k: torch.Tensor, start: torch.Tensor | None = None,
                rows_per_batch: int = 1, kmax: int | None = None, end: torch.Tensor | None = None,
                method: str = "levels", finish_max: int = FINISH_MAX) -> torch.Tensor:
    """Positions of the k[b] largest of scores[r, start[b]:end[b]] for every row r (b = r // rows_per_batch).

    scores [R, N] float32, all >= 0 (e.g. probabilities); last dim contiguous.
    k, start, end [R // rows_per_batch] integer tensors on the scores' device (start default 0, end
    default N), 1 <= k[b] <= end[b] - start[b].
    kmax: width of the result (default N); must be >= every k[b].
    method: "levels" (four histogram passes, then the compaction) or "candidates" (see the module
    docstring); both select the same set.
    Returns [R, kmax] int32: per row the k[b] positions (absolute columns) of the largest scores;
    "levels": those strictly above the k-th value first in ascending position, then ties at the k-th
    value in ascending position; "candidates": those above the k-th value's 16-bit prefix, then the
    rest of those above the k-th value, then the ties, each group in ascending position, except in rows
    where more than finish_max keys share the k-th value's 16-bit prefix (they take the "levels" order).
    Slots from k[b] on hold -1. No host synchronisation.
    """
    if method not in ("levels", "candidates"):
        raise ValueError(f"method: expected 'levels' or 'candidates', got {method!r}")
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.stride(1) != 1:
        raise ValueError(f"scores: expected a float32 [rows, N] tensor with a contiguous last dim, got "
                         f"shape {tuple(scores.shape)} dtype {scores.dtype} strides {scores.stride()}")
    rows, n = scores.shape
    if rows % rows_per_batch:
        raise ValueError(f"rows_per_batch: expected a divisor of the {rows} rows, got {rows_per_batch}")
    nb = rows // rows_per_batch
    dev = scores.device
    k_b = torch.as_tensor(k, device=dev).to(torch.int32).reshape(nb)
    start_b = (torch.zeros(nb, dtype=torch.int32, device=dev) if start is None
               else torch.as_tensor(start, device=dev).to(torch.int32).reshape(nb))
    end_b = None if end is None else torch.as_tensor(end, device=dev).to(torch.int32).reshape(nb)
    kmax = n if kmax is None else int(kmax)
    nchunk, chunk = plan_chunks(rows, n, dev)
    ws = RadixWorkspace(rows, nchunk, dev)
    ws.hist.zero_()
    out = torch.empty(rows, kmax, dtype=torch.int32, device=dev)
    if method == "candidates":
        has_end = end_b is not None
        _radix_hist_kernel[(rows, nchunk)](scores, ws.hist, k_b, start_b, end_b if has_end else start_b, n,
                                           scores.stride(0), chunk, rows_per_batch, LEVEL=1, BLOCK=BLOCK_SEL,
                                           HAS_END=has_end, num_warps=4)
        return radix_candidates(scores, n, ws, k_b, start_b, rows_per_batch, nchunk, chunk, out, end_b=end_b,
                                finish_max=finish_max)
    return radix_levels(scores, n, ws, k_b, start_b, rows_per_batch, nchunk, chunk, out, 1, end_b=end_b)
