"""Predicted attention speedup of a plan from measured per-layer kernel times.

A plan's attention time is the sum of its layers' times: layer 0 dense with selection, an anchor's
fused selection and sparse output, a reuse layer's sparse attention, and a part-selecting layer's
sparse attention plus the selection of its share of the KV heads. Against dense attention in every
layer this gives the attention speedup of decode and prefill (attention only: the rest of the model,
its weights, norms and MLPs, is the same for both). A part-selecting layer whose selecting heads are
not evenly spaced selects over a few strided views (`kascade.routing.head_slices`); each view after
the first adds `extra_slice` (a launch sequence's fixed cost). The default times are one H200's at 128K tokens
(kascade/configs/kernel_times_h200.json, with their source files).
"""

from __future__ import annotations

import json
from pathlib import Path

from kascade.plan import Plan
from kascade.routing import head_slices

KERNEL_TIMES = Path(__file__).resolve().parent / "configs" / "kernel_times_h200.json"


def load_times(path=KERNEL_TIMES) -> dict:
    return json.loads(Path(path).read_text())


def layer_times(plan: Plan, num_kv_heads: int, t: dict) -> list[float]:
    """Time of each layer of the plan under the per-layer times t (keys dense, layer0, anchor, select,
    reuse, and optionally extra_slice)."""
    n = plan.num_layers
    if n is None:
        raise ValueError("plan: needs its model fingerprint (num_layers) to be costed; use Plan.for_model")
    out = []
    for layer in range(n):
        if layer == 0:
            out.append(t["layer0"] if plan.used_by_later_layers(0, num_kv_heads) else t["dense"])
        elif plan.is_anchor(layer):
            out.append(t["anchor"])
        else:
            heads = plan.selecting_heads(layer, num_kv_heads)
            extra = max(0, len(head_slices(heads)) - 1) * t.get("extra_slice", 0.0)
            out.append(t["reuse"] + len(heads) / num_kv_heads * t["select"] + extra)
    return out


def predicted_speedup(plan: Plan, times: dict | None = None) -> dict:
    """{"decode": x, "prefill": x}: dense attention time over the plan's, summed over its layers."""
    times = times or load_times()
    hkv = plan.model["num_kv_heads"] if plan.model else len(plan.head_map[0])
    res = {}
    for phase, key in (("decode", "decode_us"), ("prefill", "prefill_ms")):
        t = times[key]
        res[phase] = plan.num_layers * t["dense"] / sum(layer_times(plan, hkv, t))
    return res
