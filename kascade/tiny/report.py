"""Results files and model card of ``kascade-tiny`` from the training logs and the evaluation.

Inputs: the output folders of the training stages (``loss.jsonl`` and
``train_info.json`` of each, in order) and the JSON written by
:mod:`kascade.tiny.evaluate`. Outputs:

* ``benchmarks/results/tiny_train.json`` - everything, machine readable;
* ``benchmarks/results/tiny_train.md`` - the same as tables;
* ``benchmarks/results/tiny_train_loss.png`` - the loss curve;
* ``models/kascade-tiny/README.md`` - the model card.

Command line::

    python -m kascade.tiny.report --runs RUN1 RUN2 --eval EVAL.json [--device-seconds N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import DATA_DIR, HELDOUT_PATH, MODEL_DIR, REPO_ROOT
from .synthetic import TRAIN_WEIGHTS

RESULTS = REPO_ROOT / "benchmarks" / "results"
DATE = "2026-11-27"


def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def collect(runs: list[Path], eval_path: Path, device_seconds: float | None, notes: list[str]) -> dict:
    stages = []
    offset_steps, offset_tokens = 0, 0
    curve = []
    for i, r in enumerate(runs):
        info = json.loads((r / "train_info.json").read_text())
        info.pop("eval_detail", None)
        info.setdefault("task_weights", dict(TRAIN_WEIGHTS))
        info["init"] = "stage %d" % i if info.get("init") else None
        log = _read_jsonl(r / "loss.jsonl")
        last = log[-5:]
        info["final_loss"] = round(sum(x["loss"] for x in last) / len(last), 4)
        info["final_loss_corpus"] = round(sum(x["loss_corpus"] for x in last) / len(last), 4)
        info["final_loss_synthetic"] = round(sum(x["loss_synthetic"] for x in last) / len(last), 4)
        info["final_loss_window_steps"] = last[-1]["step"] - last[0]["step"] + 10
        for x in log:
            curve.append({"stage": i + 1, "step": offset_steps + x["step"], "tokens": offset_tokens + x["tokens"],
                          "loss": x["loss"], "loss_corpus": x["loss_corpus"],
                          "loss_synthetic": x["loss_synthetic"], "lr": x["lr"]})
        offset_steps += info["steps"]
        offset_tokens += info["tokens"]
        stages.append(info)
    ev = json.loads(eval_path.read_text())
    for key in ("niah_single", "vt"):
        for r in ev.get(key, []):
            r.pop("samples", None)
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    shards = sorted(MODEL_DIR.glob("*.safetensors"))
    corpus_stats = _maybe_json(DATA_DIR / "corpus_stats.json")
    tok_stats = _maybe_json(DATA_DIR / "train_tokens.npy.json")
    return {
        "date": DATE,
        "model_dir": "models/kascade-tiny",
        "config": {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                       "num_attention_heads", "num_key_value_heads", "head_dim",
                                       "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                                       "rms_norm_eps") if k in cfg}
                  | {"rope_theta": (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))},
        "parameters": stages[-1]["parameters"],
        "weights": {"dtype": "bfloat16", "files": [p.name for p in shards],
                    "bytes": sum(p.stat().st_size for p in shards)},
        "data": {"corpus": corpus_stats, "pretokenized": tok_stats,
                 "heldout_bytes": HELDOUT_PATH.stat().st_size},
        "training": {
            "device": stages[0]["device"], "torch": stages[0]["torch"],
            "transformers": stages[0]["transformers"], "python": stages[0]["python"],
            "stages": stages,
            "steps": sum(s["steps"] for s in stages),
            "tokens": sum(s["tokens"] for s in stages),
            "synthetic_tokens": sum(s["synthetic_tokens"] for s in stages),
            "train_seconds": round(sum(s["train_seconds"] for s in stages), 1),
            "final_loss": stages[-1]["final_loss"],
            "final_loss_corpus": stages[-1]["final_loss_corpus"],
            "final_loss_synthetic": stages[-1]["final_loss_synthetic"],
            "device_seconds_charged": device_seconds,
        },
        "eval_cpu": {"summary": ev["summary"], "perplexity": ev["perplexity"],
                     "niah_single": ev["niah_single"], "vt": ev["vt"],
                     "torch": ev.get("torch"), "transformers": ev.get("transformers"),
                     "seconds": round(ev.get("seconds", 0), 1)},
        "notes": notes,
        "curve": curve,
    }


def _maybe_json(p: Path):
    return json.loads(p.read_text()) if p.exists() else None


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = res["curve"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = [r["tokens"] / 1e6 for r in c]
    ax.plot(x, [r["loss"] for r in c], lw=1.2, label="all tokens")
    ax.plot(x, [r["loss_corpus"] for r in c], lw=0.9, alpha=0.8, label="corpus text")
    ax.plot(x, [r["loss_synthetic"] for r in c], lw=0.9, alpha=0.8, label="synthetic documents")
    b = res["training"]["stages"][0]["tokens"] / 1e6
    ax.axvline(b, color="gray", ls="--", lw=0.8)
    ax.text(b, 5.0, " stage 2", color="gray")
    ax.set_yscale("log")
    ax.set_ylim(0.5, 9.5)
    ticks = [0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"kascade-tiny ({res['parameters'] / 1e6:.2f}M params, 8192-token sequences, "
                 f"{res['training']['device']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def tables(res: dict) -> str:
    tr, ev = res["training"], res["eval_cpu"]
    lines = ["| stage | init | steps | tokens | synthetic share | peak lr | wall (train) | tokens/s | "
             "final loss (all / corpus / synthetic) | GPU check: needle 4K / 8K, VT 8K |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(tr["stages"]):
        e = s.get("eval", {})
        lines.append(
            f"| {i + 1} | {s['init'] or 'random'} | {s['steps']:,} | {s['tokens'] / 1e6:.1f}M | "
            f"{s['synthetic_tokens'] / s['tokens']:.2f} | {s['lr']:g} | {s['train_seconds']:.0f} s | "
            f"{s['tok_per_s'] / 1e3:.0f}K | {s['final_loss']:.3f} / {s['final_loss_corpus']:.3f} / "
            f"{s['final_loss_synthetic']:.3f} | {_pct(e.get('niah_single_4096', 0))} / "
            f"{_pct(e.get('niah_single_8192', 0))} / {_pct(e.get('vt_8192', 0))} |")
    out = ["### Training", "", *lines, "",
           f"Total: {tr['steps']:,} steps, {tr['tokens'] / 1e6:.1f}M tokens "
           f"({tr['synthetic_tokens'] / tr['tokens']:.0%} in synthetic documents), "
           f"{tr['train_seconds'] / 60:.1f} min of training on one {tr['device']} "
           f"(torch {tr['torch']}, transformers {tr['transformers']}, Python {tr['python']}).", "",
           "### Quality (CPU, bf16 weights upcast to float32, greedy)", "",
           "| context | held-out perplexity (per token) |", "|---|---|"]
    for r in ev["perplexity"]:
        out.append(f"| {r['ctx']} | {r['ppl']:.3f} ({r['tokens']:,} tokens, {r['windows']} windows) |")
    out += ["", "| task | context | samples | accuracy | recall | filler / essay |", "|---|---|---|---|---|---|"]
    for r in ev["niah_single"] + ev["vt"]:
        split = " / ".join(_pct(r[k]) if k in r else "-" for k in ("accuracy_filler", "accuracy_essay"))
        out.append(f"| {r['task']} | {r['ctx']} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['recall'])} | {split} |")
    out += ["", f"Evaluated with torch {ev['torch']}, transformers {ev['transformers']} on CPU "
                f"in {ev['seconds'] / 60:.1f} min."]
    return "\n".join(out)


def markdown(res: dict) -> str:
    tr = res["training"]
    head = [f"# kascade-tiny training run ({res['date']})", "",
            f"Model `{res['model_dir']}`: Llama, {res['parameters']:,} parameters, "
            f"bf16 weights {res['weights']['bytes'] / 2 ** 20:.1f} MiB in {len(res['weights']['files'])} shards. "
            "Recipe and data: the model card (`models/kascade-tiny/README.md`); code: `kascade/tiny/`.", "",
            tables(res), "", "![loss](tiny_train_loss.png)", ""]
    if tr.get("device_seconds_charged") is not None:
        head += [f"Device time charged for the smoke test and both stages: {tr['device_seconds_charged']:.0f} s.", ""]
    if res["notes"]:
        head += ["### Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(head)


def model_card(res: dict) -> str:
    cfg, tr, ev = res["config"], res["training"], res["eval_cpu"]
    s1, s2 = tr["stages"][0], tr["stages"][-1]
    corpus = res["data"]["corpus"] or {}
    pre = res["data"]["pretokenized"] or {}
    w2 = ", ".join(f"{k} {v:g}" for k, v in s2["task_weights"].items())
    w1 = ", ".join(f"{k} {v:g}" for k, v in s1["task_weights"].items())
    return f"""# kascade-tiny

A small Llama trained from scratch by the kascade project so that sparse-attention experiments
have a model with real long-range attention that ships with the repository: it is the default
model of `kascade demo`, of calibration and of the accuracy tables. It retrieves needles from
8K-token contexts and follows variable-assignment chains; it is not a general language model.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("models/kascade-tiny")
model = AutoModelForCausalLM.from_pretrained("models/kascade-tiny")
```

## Architecture

`LlamaForCausalLM` (transformers), {res['parameters']:,} parameters (tied embeddings counted once),
stored in bfloat16 ({res['weights']['bytes'] / 2 ** 20:.1f} MiB, {len(res['weights']['files'])} safetensors shards).

| | |
|---|---|
| layers | {cfg['num_hidden_layers']} |
| hidden size | {cfg['hidden_size']} |
| attention | {cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} key/value heads (GQA group {cfg['num_attention_heads'] // cfg['num_key_value_heads']}), head dim {cfg['head_dim']} |
| MLP | SwiGLU, intermediate {cfg['intermediate_size']} |
| positions | RoPE, theta {cfg['rope_theta']:g}, {cfg['max_position_embeddings']} positions (trained at 8192) |
| vocabulary | {cfg['vocab_size']} (byte-level BPE), tied input/output embeddings |
| norm | RMSNorm, eps {cfg['rms_norm_eps']:g} |

## Tokenizer

Byte-level BPE trained with `tokenizers` (`kascade/tiny/tokenizer.py`): {cfg['vocab_size']} tokens including
`<s>` (bos, id 0), `</s>` (eos, id 1) and `<pad>` (id 2). Digits are split one by one before the byte-level
step, so every number is a sequence of single-digit tokens. Encoding prepends `<s>`. It averages
{pre.get('chars_per_token', 0):.2f} characters per token on the training text.

## Data

* **Corpus** (`kascade/tiny/corpus.py`): the `.py` files of a Python 3.11 standard library and its
  site-packages (torch, transformers, numpy, sympy, matplotlib, ...): {corpus.get('files', 0):,} files, exact
  duplicates removed, each file giving a source document and a docstring document. About 3% of the
  files (by a hash of their relative path) are held out; `data/heldout.txt` ({res['data']['heldout_bytes'] / 1e6:.1f} MB)
  holds held-out docstrings and every third held-out source file. Training text: {corpus.get('train_docs', 0):,}
  documents, {corpus.get('train_chars', 0) / 1e6:.0f}M characters, {pre.get('tokens', 0) / 1e6:.1f}M tokens.
  The text is third-party source under its own licenses, used as training data.
* **Synthetic retrieval documents** (`kascade/tiny/synthetic.py`, formats in `kascade/eval/templates.py`),
  generated on the fly with training seeds (>= 1,000,000) and training keys only: needle in a haystack
  (single, multi-key, multi-value, multi-query; filler or corpus haystack), key-value retrieval over a JSON
  object of uuids, variable tracking, verbatim copying and sequence continuation. Evaluation uses seeds below
  1,000,000 and the disjoint evaluation key pool.

Every training sequence has 8192 real tokens: about half start with synthetic documents (mostly 4K-8K
tokens long) and are completed with corpus text, the others are corpus windows.

## Training

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), batch 16 x 8192 tokens, bf16 autocast, SDPA
attention, gradient clipping at 1, linear warmup then cosine decay driven by the wall-clock budget.
One {tr['device']} (torch {tr['torch']}, transformers {tr['transformers']}).

| stage | start | steps | tokens | peak lr | wall | tokens/s | final loss (all / corpus / synthetic) |
|---|---|---|---|---|---|---|---|
| 1 | random init | {s1['steps']:,} | {s1['tokens'] / 1e6:.0f}M | {s1['lr']:g} (warmup {s1['warmup']}) | {s1['train_seconds'] / 60:.1f} min | {s1['tok_per_s'] / 1e3:.0f}K | {s1['final_loss']:.3f} / {s1['final_loss_corpus']:.3f} / {s1['final_loss_synthetic']:.3f} |
| 2 | stage 1 | {s2['steps']:,} | {s2['tokens'] / 1e6:.0f}M | {s2['lr']:g} (warmup {s2['warmup']}) | {s2['train_seconds'] / 60:.1f} min | {s2['tok_per_s'] / 1e3:.0f}K | {s2['final_loss']:.3f} / {s2['final_loss_corpus']:.3f} / {s2['final_loss_synthetic']:.3f} |

Total {tr['steps']:,} steps, {tr['tokens'] / 1e6:.0f}M tokens ({tr['synthetic_tokens'] / tr['tokens']:.0%} synthetic), {tr['train_seconds'] / 60:.1f} minutes.
Stage 1 task mix: {w1}. Stage 2 raised variable tracking (mix: {w2}; {s2['syn_seq_frac']:.0%} of
sequences with synthetic documents) and 70% of its variable-tracking documents ask about every chain, one
question per line, after the first answer. Final loss: mean of the last {s2['final_loss_window_steps']} steps.
Curve: `benchmarks/results/tiny_train_loss.png`.

## Quality

Measured on CPU (`python -m kascade.tiny.evaluate`), greedy decoding, evaluation seeds and keys:

{tables(res).split('### Quality (CPU, bf16 weights upcast to float32, greedy)')[1].strip()}

Perplexity: `data/heldout.txt` cut into windows of the given length (the same first
{ev['perplexity'][0]['tokens'] + ev['perplexity'][0]['windows']:,} tokens at every length), per token.
Needle: "One of the special magic numbers for {{key}} is: {{value}}." at evenly spaced depths, haystack
alternating between the repeated filler sentences and held-out text; correct when the first number generated
is the 7-digit value. Variable tracking: one chain of 4 hops in filler text; correct when the generated names
are exactly the chain (recall: fraction of the chain's names generated).

## Reproduce

```bash
python -m kascade.tiny.corpus                       # .data/train.txt, data/heldout.txt
python -m kascade.tiny.tokenizer train              # .data/tokenizer/
python -m kascade.tiny.tokenizer pretokenize --carry .data/carry
python -m kascade.tiny.train --minutes 7.9 --out RUN1 --pack            # stage 1 (GPU)
python -m kascade.tiny.train --minutes 7.9 --out RUN2 --pack --init RUN1_MODEL --lr 1e-3 --warmup 30 \
    --min-lr-frac 0.05 --syn-frac 0.6 --seed 1000002 --task-weights {",".join(f"{k}={v:g}" for k, v in s2["task_weights"].items())}
python -m kascade.tiny.evaluate --device cpu --samples 40 --out EVAL.json
python -m kascade.tiny.report --runs RUN1 RUN2 --eval EVAL.json
```

`RUN1_MODEL` is stage 1's model folder (with `--pack`: its shards plus the unpacked `model_files.tar.gz`).
The corpus depends on the packages installed where it is built. Stage 1 ran before the
multi-question variable-tracking documents existed; with the current code both stages use them.

## Limits

Trained for {tr['train_seconds'] / 60:.0f} minutes on {tr['tokens'] / 1e6:.0f}M tokens of mostly Python: it writes plausible-looking
code and docstrings but knows little; it has seen only the task formats of `kascade/eval/templates.py`; it
was not trained beyond 8192 positions.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kascade-tiny results and model card")
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--eval", type=Path, required=True)
    ap.add_argument("--device-seconds", type=float, default=None)
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args(argv)
    res = collect(args.runs, args.eval, args.device_seconds, args.note)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tiny_train.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "tiny_train.md").write_text(markdown(res))
    plot(res, RESULTS / "tiny_train_loss.png")
    (MODEL_DIR / "README.md").write_text(model_card(res))
    print(tables(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
