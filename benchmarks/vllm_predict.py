"""The decode step a vLLM serving cell should take by the kernel replays of benchmarks/decode.py, and how far the
measured step is from it: where a serving ratio loses against the kernels.

    predict(cells, kernels, mode="graph", weights="dummy") -> {provider: row}   one row per Kascade cell
    markdown(prediction) -> list of lines

For each Kascade cell of the workload whose prompt length the kernel file has (`long`, 131072), beside the
FlashAttention cell of the same mode and weights:
    rest      = FlashAttention's inter-token latency - fa3(B)        the MLPs, norms, sampling and vLLM's own work
    predicted = rest + ours(B)                                       the step if attention took its replay time
    excess    = measured inter-token latency - predicted,  and per selecting layer (the plan's anchors)
fa3(B) and ours(B) are the whole-model CUDA-graph times of the kernel file (`whole_model` for 5 anchors,
`whole_model_10` for 10 selecting layers, `whole_model_fp8` / `whole_model_10_fp8` for the -fp8 providers; the
-chunked ones as their plans: the replays' scores are not flat, so the chunked finish changes little there) at
the cell's batch B, or interpolated linearly between the nearest batches it has at that length (decode attention
reads bytes in proportion to the batch); none where B is outside them. A kernel row whose anchors differ from the
provider's plan is not used. The kernel replays run on random Gaussian q and k, so the excess also holds what the
cell's weights do to the selection (vLLM's dummy weights make every score nearly equal).
"""

from __future__ import annotations

KERNEL_TABLES = {"anchors5": "whole_model", "selecting10": "whole_model_10", "anchors5-fp8": "whole_model_fp8",
                 "selecting10-fp8": "whole_model_10_fp8", "anchors5-chunked": "whole_model",
                 "selecting10-chunked": "whole_model_10"}
DEFAULT_ANCHORS = {"whole_model": [0, 2, 8, 13, 14]}  # benchmarks/decode.py's ANCHORS (older files omit them)


def at_batch(table: dict, batch: int, length: int, key: str) -> float | None:
    """table[f"{B}x{length}"][key]["ms"] at B = batch, linear between the nearest batches around it; None outside."""
    rows = {r["B"]: r[key]["ms"] for r in table.values() if r.get("N") == length and key in r}
    if batch in rows:
        return rows[batch]
    below = [b for b in rows if b < batch]
    above = [b for b in rows if b > batch]
    if not below or not above:
        return None
    lo, hi = max(below), min(above)
    return rows[lo] + (rows[hi] - rows[lo]) * (batch - lo) / (hi - lo)


def predict(cells: dict, kernels: dict, anchors_of: dict, cell_name, workloads: dict, mode: str = "graph",
            weights: str = "dummy") -> dict:
    """One row per Kascade provider whose cell, FlashAttention cell and kernel rows exist (module docstring).
    anchors_of: provider -> its plan's anchors (vllm_serving.PROVIDERS); cell_name(workload, mode, provider,
    weights) -> a cell's key; workloads: workload -> prompt length."""
    out = {}
    for workload, length in workloads.items():
        base = cells.get(cell_name(workload, mode, "flash", weights))
        if base is None:
            continue
        for provider, table_name in KERNEL_TABLES.items():
            cell = cells.get(cell_name(workload, mode, provider, weights))
            table = kernels.get(table_name)
            if cell is None or not table:
                continue
            anchors = anchors_of[provider]
            rows = [r for r in table.values() if r.get("N") == length]
            if any(r.get("anchors", DEFAULT_ANCHORS.get(table_name)) != anchors for r in rows):
                continue
            fa3 = at_batch(table, cell["batch"], length, "fa3")
            ours = at_batch(table, cell["batch"], length, "ours")
            if fa3 is None or ours is None:
                continue
            rest = base["itl_ms"] - fa3
            predicted = rest + ours
            excess = cell["itl_ms"] - predicted
            out[f"{workload}-{provider}"] = dict(
                workload=workload, provider=provider, batch=cell["batch"], length=length, weights=weights,
                flash_itl_ms=base["itl_ms"], fa3_graph_ms=fa3, rest_ms=rest, kascade_graph_ms=ours,
                predicted_itl_ms=predicted, predicted_ratio=base["itl_ms"] / predicted, measured_itl_ms=cell["itl_ms"],
                measured_ratio=base["itl_ms"] / cell["itl_ms"], excess_ms=excess, selecting_layers=len(anchors),
                excess_per_selecting_layer_ms=excess / len(anchors))
    return out


def markdown(prediction: dict, kernels_meta: dict) -> list[str]:
    """The report's section: one line per row of predict()."""
    if not prediction:
        return []
    lines = ["", "## Against the kernel replays", "",
             f"The step each cell should take if attention ran at the whole-model CUDA-graph times of "
             f"benchmarks/decode.py ({kernels_meta.get('device')}, {kernels_meta.get('date')}; random Gaussian q and k, "
             "batches the file lacks interpolated linearly): FlashAttention's inter-token latency less 32 FA3 layers is "
             "the rest of the step, plus Kascade's graph (times in ms; method: benchmarks/vllm_predict.py).", "",
             "| cell | weights | batch | FlashAttention ITL | 32 x FA3 | rest | Kascade graph | predicted ITL (ratio) | "
             "measured ITL (ratio) | excess | per selecting layer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in prediction.items():
        lines.append(f"| {name} | {r['weights']} | {r['batch']} x {r['length']} | {r['flash_itl_ms']:.2f} | "
                     f"{r['fa3_graph_ms']:.2f} | {r['rest_ms']:.2f} | {r['kascade_graph_ms']:.2f} | "
                     f"{r['predicted_itl_ms']:.2f} ({r['predicted_ratio']:.2f}x) | "
                     f"{r['measured_itl_ms']:.2f} ({r['measured_ratio']:.2f}x) | {r['excess_ms']:.2f} | "
                     f"{r['excess_per_selecting_layer_ms']:.2f} |")
    return lines
