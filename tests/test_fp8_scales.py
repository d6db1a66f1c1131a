"""benchmarks/fp8_scales.py: its scale schemes round-trip like kascade.fp8keys where they should, and its measurement
returns one row per (mode, keys, queries) with recall and mass in [0, 1]."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fp8_scales as FSC  # noqa: E402
from kascade import fp8keys  # noqa: E402


def test_schemes_round_trip():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 300, 16, generator=g)
    assert torch.equal(FSC.keys_per_token(k), fp8keys.dequantize(*fp8keys.quantize(k)).float())
    one_block = torch.randn(1, 2, 1, 16, generator=g).expand(1, 2, 128, 16) * torch.rand(1, 2, 128, 1, generator=g)
    blocks = FSC.keys_per_block(one_block)
    assert blocks.shape == one_block.shape and (blocks - one_block).abs().max() <= one_block.abs().max() / 16
    q = torch.randn(1, 4, 70, 16, generator=g)
    tiled = FSC.queries_per_tile(q, hkv=2)
    assert tiled.shape == q.shape and (tiled - q).abs().max() <= q.abs().max() / 16
    big = k.clone()
    big[:, :, 299] *= 100  # beyond the per-channel scales' headroom: clamped to e4m3's range
    assert FSC.keys_per_channel(big, first=128).abs().max() < big.abs().max()


def test_measure_rows():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 600, 16, generator=g), torch.randn(1, 2, 600, 16, generator=g)
    rows = FSC.measure([(q, k)], 2, decode_queries=2, tiles=2)
    assert len(rows) == len(FSC.KEYS) * (1 + len(FSC.QUERIES))
    assert all(0 <= r["recall"] <= 1 and 0 < r["mass"] <= 1 + 1e-6 for r in rows)
