"""A serving engine's steps change their lengths every time: the paged kernel path must not need a new compiled
Triton variant for new lengths (a compilation takes seconds on the GPU; vLLM steps call these kernels in every
layer). Recorded in Triton's CPU interpreter (tests/kernel_variants.py): steps of one shape with some lengths
first, then the same shapes with other lengths, which must add no specialization key to any kernel.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from kernel_variants import differing, launch_key, record  # noqa: E402
from test_paged_reference import make_batch  # noqa: E402

from kascade.paged import PagedKascadeStrategy  # noqa: E402
from kascade.plan import Plan  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records interpreted launches")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLAN = Plan(anchors=[0, 2], head_map=[[0, 1], [1, 0], [0, 1], [1, 1]], rho=0.1, k_min=16)


def steps(seed: int, count: int) -> list:
    """(seq_lens, q_lens) of steps alternating a whole prompt and a chunk on top of a cache, each beside two
    decode requests; lengths drawn at random (both classes of divisibility by 16 occur)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        n = [rng.randint(100, 400) for _ in range(3)]
        q0 = n[0] if i % 2 == 0 else rng.randint(2, 60)
        out.append((n, [q0, 1, 1]))
    return out


def run_steps(strategy, todo, seed):
    for i, (lens, qlens) in enumerate(todo):
        batch, _ = make_batch(lens, qlens, hq=8, hkv=2, d=16, dtype=torch.bfloat16, seed=seed + i)
        for layer in range(PLAN.num_layers):
            strategy.attend(layer, **batch, scale=0.25)


def test_new_lengths_compile_no_new_variant():
    strategy = PagedKascadeStrategy(PLAN, backend="triton")
    with record() as warm:
        run_steps(strategy, steps(0, 4), seed=0)
    with record() as later:
        run_steps(strategy, steps(1, 3), seed=100)
    assert {"_pool_kernel", "_topk_rows_kernel", "_sparse_prefill_kernel", "_resolve_rows_kernel"} <= set(warm)
    new = {name: differing(keys | warm.get(name, set())) for name, keys in later.items()
           if not keys <= warm.get(name, set())}
    assert not new, f"kernels that would compile again for new lengths (arguments whose key differs): {new}"


def test_decode_batch_sizes_share_the_main_decode_kernels():
    """The splits per row (NSPLIT) and the top-k's chunks per row (NCHUNK) follow the batch size; the kernels take
    them at run time (the pool and combine kernels read the split partials through one of two padded ranges), so
    the batch sizes of CUDA-graph capture and of mixed steps compile each kernel once per layer mode (twice for
    pool and combine)."""
    strategy = PagedKascadeStrategy(PLAN, backend="triton")
    rng = random.Random(2)

    def decode_steps(sizes):
        for r in sizes:
            batch, _ = make_batch([rng.randint(100, 400) for _ in range(r)], [1] * r, hq=8, hkv=2, d=16,
                                  dtype=torch.bfloat16, seed=r)
            for layer in range(PLAN.num_layers):
                strategy.attend_decode(layer, batch["q"], batch["key_cache"], batch["value_cache"],
                                       batch["block_table"], batch["seq_lens"], scale=0.25)

    with record() as small:
        decode_steps([1])
    with record() as large:
        decode_steps([4, 16])
    from kascade.kernels.decode import _splits

    assert len({_splits(r * 2, DEVICE, 4) for r in (1, 4, 16)}) > 1  # the batch sizes do change the splits
    from kascade.kernels.decode import split_pad

    pads = {split_pad(_splits(r * 2, DEVICE, 4)) for r in (1, 4, 16)}
    for name in ("_decode_logits_kernel", "_decode_sparse_kernel", "_radix_last_kernel", "_radix_split_kernel",
                 "_radix_finish_kernel", "_resolve_rows_kernel"):
        assert large[name] <= small[name], (name, differing(large[name] | small[name]))
    for name in ("_decode_pool_kernel", "_decode_combine_kernel"):  # one variant per split_pad range
        assert len(large[name] | small[name]) <= len(small[name]) * len(pads), (name, differing(large[name] | small[name]))


def test_recorder_sees_specialization():
    """The recorder's key tells an int of 1, one divisible by 16 and another apart, unless not specialized."""

    class Fake:
        def __init__(self, dns=()):
            self.kwargs = {"do_not_specialize": dns}

        @staticmethod
        def fn(X, n, m):
            pass

    x = torch.zeros(4)
    keys = {launch_key(Fake(), (x, n, 3), {}) for n in (1, 16, 17, 32)}
    assert len(keys) == 3
    keys = {launch_key(Fake(["n"]), (x, n, 3), {}) for n in (1, 16, 17, 32)}
    assert len(keys) == 1
