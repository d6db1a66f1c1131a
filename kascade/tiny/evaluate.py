"""Quality of ``kascade-tiny``: held-out perplexity and retrieval accuracy.

* Perplexity (per token) on ``data/heldout.txt`` at context lengths 1K, 4K
  and 8K: the held-out text is tokenised once and cut into non-overlapping
  windows of the given length; every token of a window after its first is
  scored. The same token range is used at every length.
* Single-needle retrieval (``niah_single``) at 2K, 4K and 8K tokens and
  variable tracking (``vt``, one chain of 4 hops, filler haystack) at 4K and
  8K, on evaluation seeds (``< 1_000_000``, evaluation keys), greedy
  generation. A needle sample is correct iff the first number generated
  equals the magic number; a variable-tracking sample is correct iff the set
  of variable names generated (up to the first line break) equals the chain
  (``recall`` is also reported). Needle depths are evenly spaced over the
  samples and the haystack alternates between filler and held-out text.

Command line::

    python -m kascade.tiny.evaluate [--model models/kascade-tiny] [--samples 30]
        [--out benchmarks/results/tiny_eval.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from kascade.eval import templates as T

from . import HELDOUT_PATH, MODEL_DIR
from .synthetic import TASKS, FillerHaystack, StringSource, fit_to_tokens, make_sample

NUMBER_RE = re.compile(r"\d+")
VAR_RE = re.compile(r"\b[A-Z]{5}\b")


def load_model(model_dir: Path | str = MODEL_DIR, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model.to(device).eval()
    return model, tok


def _autocast(device: str, dtype: torch.dtype | None):
    if dtype is None or device == "cpu":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@torch.no_grad()
def perplexity(model, tok, text: str, ctx_len: int, n_tokens: int = 65536,
               device: str = "cpu", amp: torch.dtype | None = None) -> dict:
    """Per-token perplexity over the first ``n_tokens`` tokens of ``text``."""
    ids = tok(text, add_special_tokens=False)["input_ids"][:n_tokens]
    n_win = len(ids) // ctx_len
    if n_win == 0:
        raise ValueError("text too short for this context length")
    nll, count = 0.0, 0
    for w in range(n_win):
        x = torch.tensor([ids[w * ctx_len:(w + 1) * ctx_len]], device=device)
        with _autocast(device, amp):
            logits = model(input_ids=x, use_cache=False).logits
        lp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        nll -= lp.gather(1, x[0, 1:, None]).sum().item()
        count += ctx_len - 1
    return {"ctx": ctx_len, "ppl": math.exp(nll / count), "nll": nll / count,
            "tokens": count, "windows": n_win}


def _cache_argument(model) -> str:
    """Name of the KV-cache argument of ``model.forward`` (``cache`` in newer
    transformers, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def greedy(model, input_ids: list[int], max_new: int, device: str, amp: torch.dtype | None,
           stop_ids: set[int]) -> list[int]:
    """Greedy continuation with the KV cache (prefill, then one token at a time)."""
    x = torch.tensor([input_ids], device=device)
    out: list[int] = []
    past = None
    key = _cache_argument(model)
    for _ in range(max_new):
        with _autocast(device, amp):
            res = model(input_ids=x, use_cache=True, **({key: past} if past is not None else {}))
        past = res.get("cache", None) if hasattr(res, "get") else None
        if past is None:
            past = getattr(res, "past_key_values", None)
        nxt = int(res.logits[0, -1].argmax())
        if nxt in stop_ids:
            break
        out.append(nxt)
        x = torch.tensor([[nxt]], device=device)
    return out


def build_eval_sample(task: str, seed: int, ctx_len: int, tok, essay: StringSource | None,
                      haystack: str, **kw):
    """A sample of ``task`` from evaluation ``seed`` whose text fits ``ctx_len`` tokens."""
    filler = FillerHaystack()

    def build(n_chars):
        return make_sample(task, seed, n_chars, "eval", filler=filler, essay=essay,
                           haystack=haystack, **kw)

    def count(text):
        return len(tok(text)["input_ids"])

    return fit_to_tokens(build, ctx_len, count, chars_per_token=3.0 if haystack == "essay" else 4.0)


def eval_seed(task: str, ctx_len: int, index: int, seed_base: int = 0) -> int:
    """Evaluation seed of sample ``index`` of ``task`` at ``ctx_len`` (always < 1_000_000)."""
    if not 0 <= index < 1000 or ctx_len >= 100 * 1024:
        raise ValueError("index must be < 1000 and ctx_len < 100K")
    return seed_base + TASKS.index(task) * 100_000 + (ctx_len // 1024) * 1000 + index


def score(task: str, sample, prediction: str) -> tuple[float, float]:
    """``(correct, recall)`` of a generated continuation."""
    if task.startswith("niah"):
        if task == "niah_single":
            m = NUMBER_RE.search(prediction)
            ok = float(m is not None and m.group(0) == sample.answers[0])
            return ok, ok
        rec = T.match_all(prediction, sample.answers)
        return float(rec == 1.0), rec
    if task == "vt":
        line = prediction.strip().split("\n")[0]
        names = set(VAR_RE.findall(line))
        want = set(sample.answers)
        return float(names == want), len(names & want) / len(want)
    if task == "kv":
        ok = float(sample.answers[0] in prediction)
        return ok, ok
    rec = T.match_all(prediction, sample.answers)
    return float(rec == 1.0), rec


def retrieval(model, tok, task: str, ctx_len: int, n: int, essay: StringSource | None,
              device: str = "cpu", amp: torch.dtype | None = None, seed_base: int = 0,
              haystacks: tuple[str, ...] = ("filler", "essay"), max_new: int | None = None,
              time_limit: float | None = None, **kw) -> dict:
    """Accuracy of greedy generation on ``n`` evaluation samples of ``task``."""
    T.check_seed(eval_seed(task, ctx_len, n - 1, seed_base), "eval")
    stop = {tok.eos_token_id}
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    if len(nl) == 1 and task not in ("copy", "seq"):
        stop.add(nl[0])
    if max_new is None:
        max_new = {"niah_single": 12, "vt": 40}.get(task, 64)
    t0 = time.time()
    rows = []
    for i in range(n):
        if time_limit is not None and time.time() - t0 > time_limit:
            break
        hs = haystacks[i % len(haystacks)]
        extra = dict(kw)
        if task == "niah_single":
            extra.setdefault("depths", [(i + 0.5) / n])
        seed = eval_seed(task, ctx_len, i, seed_base)
        sample, n_tok = build_eval_sample(task, seed, ctx_len, tok, essay, hs, **extra)
        ids = tok(sample.prompt)["input_ids"]
        gen = greedy(model, ids, max_new, device, amp, stop)
        pred = tok.decode(gen, skip_special_tokens=True)
        ok, rec = score(task, sample, pred)
        rows.append({"seed": seed, "haystack": hs, "prompt_tokens": len(ids), "correct": ok,
                     "recall": rec, "answer": sample.answer.strip(), "prediction": pred.strip()[:200],
                     "depth": sample.meta.get("depths", [None])[0]})
    m = len(rows)
    res = {"task": task, "ctx": ctx_len, "n": m,
           "accuracy": sum(r["correct"] for r in rows) / max(1, m),
           "recall": sum(r["recall"] for r in rows) / max(1, m),
           "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / max(1, m),
           "seconds": time.time() - t0}
    for hs in haystacks:
        sub = [r for r in rows if r["haystack"] == hs]
        if sub:
            res[f"accuracy_{hs}"] = sum(r["correct"] for r in sub) / len(sub)
    res["samples"] = rows
    return res


def evaluate_all(model, tok, device: str = "cpu", amp: torch.dtype | None = None, samples: int = 30,
                 ppl_lengths=(1024, 4096, 8192), niah_lengths=(2048, 4096, 8192),
                 vt_lengths=(4096, 8192), ppl_tokens: int = 65536, vt_samples: int | None = None,
                 time_limit: float | None = None, log=print) -> dict:
    essay_text = HELDOUT_PATH.read_text(encoding="utf-8")
    essay = StringSource(essay_text)
    out: dict = {"perplexity": [], "niah_single": [], "vt": []}
    for L in ppl_lengths:
        r = perplexity(model, tok, essay_text, L, ppl_tokens, device, amp)
        out["perplexity"].append(r)
        log(f"ppl@{L}: {r['ppl']:.3f} ({r['tokens']} tokens)")
    for L in niah_lengths:
        r = retrieval(model, tok, "niah_single", L, samples, essay, device, amp, time_limit=time_limit)
        out["niah_single"].append(r)
        log(f"niah_single@{L}: {r['accuracy']:.3f} (n={r['n']}, {r['seconds']:.0f}s)")
    for L in vt_lengths:
        r = retrieval(model, tok, "vt", L, vt_samples or samples, essay, device, amp,
                      haystacks=("filler",), n_chains=1, n_hops=4, time_limit=time_limit)
        out["vt"].append(r)
        log(f"vt@{L}: exact {r['accuracy']:.3f} recall {r['recall']:.3f} (n={r['n']}, {r['seconds']:.0f}s)")
    return out


def summary(res: dict) -> dict:
    """The headline numbers of :func:`evaluate_all` (no per-sample rows)."""
    s = {}
    for r in res.get("perplexity", []):
        s[f"ppl_{r['ctx']}"] = round(r["ppl"], 4)
    for r in res.get("niah_single", []):
        s[f"niah_single_{r['ctx']}"] = round(r["accuracy"], 4)
    for r in res.get("vt", []):
        s[f"vt_{r['ctx']}"] = round(r["accuracy"], 4)
        s[f"vt_recall_{r['ctx']}"] = round(r["recall"], 4)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="evaluate kascade-tiny")
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--vt-samples", type=int, default=None)
    ap.add_argument("--ppl-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = torch.bfloat16 if args.device.startswith("cuda") else None
    model, tok = load_model(args.model, args.device)
    t0 = time.time()
    res = evaluate_all(model, tok, args.device, amp, args.samples, ppl_tokens=args.ppl_tokens,
                       vt_samples=args.vt_samples)
    res["summary"] = summary(res)
    res["device"] = args.device
    res["seconds"] = time.time() - t0
    res["torch"] = torch.__version__
    import transformers
    res["transformers"] = transformers.__version__
    print(json.dumps(res["summary"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
