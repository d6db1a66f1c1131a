"""What vLLM's dummy weights do to attention: the pooled decode scores of a model of the Llama-3.1-8B attention
shape (2 layers, small vocabulary) whose every parameter is uniform in +-1e-3, as vLLM's dummy load format draws
them. CPU, bf16, a few seconds.

    python benchmarks/dummy_scores.py [--tokens 2048] [-o benchmarks/results/dummy_scores_cpu.md]

Per layer: the largest |q|, |k| and |logit| at the last position, and per KV head the number of distinct pooled
scores (softmax over the keys, summed over the query group, as an anchor pools them) and of their distinct 16-bit
prefixes (the top-k's candidate key). One distinct value means every key ties: the selection's worst case, which
benchmarks/flat_topk.py times as "tied".
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             rope_theta=500000.0)


def measure(tokens: int, layers: int = 2, seed: int = 0) -> list[dict]:
    """One row per layer: max |q|, |k|, |logit| and per KV head the distinct pooled scores and 16-bit prefixes."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=2048, num_hidden_layers=layers, max_position_embeddings=max(8192, tokens), **SHAPE)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-1e-3, 1e-3)
    seen = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            getattr(layer.self_attn, name).register_forward_hook(
                lambda mod, inp, out, key=(i, name): seen.__setitem__(key, out.detach().float()[0]))
    with torch.no_grad():
        model(torch.randint(0, cfg.vocab_size, (1, tokens)))
    hkv, d = cfg.num_key_value_heads, cfg.head_dim
    rows = []
    for i in range(layers):
        q = seen[i, "q_proj"][-1].view(hkv, -1, d)  # [Hkv, G, D] at the last position
        k = seen[i, "k_proj"].view(tokens, hkv, d).transpose(0, 1)  # [Hkv, N, D]
        logits = torch.einsum("hgd,hnd->hgn", q, k) / d ** 0.5
        pooled = torch.softmax(logits, -1).sum(1)  # [Hkv, N]
        rows.append({"layer": i, "q_max": q.abs().max().item(), "k_max": k.abs().max().item(),
                     "logit_max": logits.abs().max().item(),
                     "distinct_scores": [len(torch.unique(pooled[h])) for h in range(hkv)],
                     "distinct_prefixes": [len(torch.unique(pooled[h].view(torch.int32) >> 15)) for h in range(hkv)]})
    return rows


def markdown(rows: list[dict], tokens: int) -> str:
    lines = [f"# Attention scores under vLLM's dummy weights (CPU, {datetime.date.today().isoformat()})", "",
             f"torch {torch.__version__}, transformers {transformers.__version__}; `python benchmarks/dummy_scores.py "
             f"--tokens {tokens}`: a 2-layer model of the Llama-3.1-8B attention shape, every parameter uniform in "
             f"+-1e-3 (vLLM's dummy load format), bf16, {tokens} random tokens; the last position's query.", "",
             "| layer | max abs q | max abs k | max abs logit | distinct pooled scores per KV head | "
             "distinct 16-bit prefixes |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['q_max']:.2e} | {r['k_max']:.2e} | {r['logit_max']:.2e} | "
                     f"{r['distinct_scores']} | {r['distinct_prefixes']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("-o", default=None, help="write the markdown table here (default: print it)")
    a = ap.parse_args()
    md = markdown(measure(a.tokens), a.tokens)
    if a.o:
        Path(a.o).write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
