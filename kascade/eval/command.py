"""`kascade eval`: accuracy of attention strategies on generated long-context tasks, dense beside each.

    kascade eval models/kascade-tiny --plan plans/kascade-tiny.json --tasks niah_single,vt,kv,copy \\
        --lengths 2048,4096 --budgets 0.05,0.1,0.2 --strategies kascade,oracle,quest --samples 10 --out results/

For every task, length and sample (seeds 0..samples-1, the evaluation range), the prompt is generated
at exactly that many tokens with the model's tokenizer; each strategy at each budget (and dense, once)
continues it greedily, and the continuation is scored (`kascade.eval.tasks.score`). Writes, in --out:

    results.jsonl          one line per (task, length, budget, strategy, sample), appended as each batch finishes
    run.json               what the results depend on (model, plans, k_min, max new tokens, data)
    summary.md / .json     mean score (%) per strategy x (task, length), one table per budget, dense first;
                           the headline (mean over the tasks dense scores at least 20 on) per strategy
    accuracy_vs_budget.png the headline score against budget, per strategy (dense as a line), and per task
    coverage.png / .json   attention-mass coverage per layer of each strategy on the first prompt

--longbench FILE adds a LongBench-format JSONL file as a task ("longbench/<file name>"): its first
--samples examples, each prompt cut to at most every --lengths tokens, scored by LongBench's metric
of the example's dataset, with LongBench's generation lengths (capped by --max-new-tokens).

Strategies: all of `kascade.eval.strategies.STRATEGIES` by default but the measured mechanisms
(`MECHANISMS`: kascade-dense-anchors, kascade-sinks, kascade-fp8, kascade-fp8-rerank2, oracle-shared-budget,
kascade-shared-budget, run when named), kascade-paper only when --paper-plan gives the plan of the paper's recipe
(its hash joins the run's identity, like --plan's). The decode-time baselines (quest-decode, tidaldecode, omnikv-decode) always prefill densely.

Decode-only mode: --sparse-prefill no runs every strategy with a dense prefill and its sparse selection in
decode steps; its rows are kept under the strategy's name with the suffix "+dense-prefill" (dense and the
decode-time baselines, which have one mode, keep their names), so one --out folder can hold both modes.
A name with the suffix may also be given in --strategies (e.g. kascade,kascade+dense-prefill: both modes
in one run).

Batches (--batch N; default 16 on CUDA, 1 on the CPU): the samples of one (task, length, budget,
strategy) cell run together, one prefill and one decode step per token for the batch
(`kascade.eval.generation.greedy_batch`); the prompts of a generated task all have the cell's length, so
no padding is needed. LongBench prompts of different lengths are split into groups of one length (each
group a batch of its own; the run says how many batches were split). A row's "seconds" is the time of
its batch divided by the batch's rows. Jobs run in rounds: the first --batch samples of every cell, then
the next ones, so a run cut short still fills every cell. Prompts are made ahead of their batches by
--workers processes (default on CUDA: half the cores, at most 8; on the CPU: none, made in this process),
so the device does not wait for the tokenizer. On CUDA with --backend auto the Triton kernels
must import (else the run would silently take the slow reference path): pass --backend reference to
accept that path.

A rerun with the same --out skips the keys already in results.jsonl (resume after an interruption, or
add samples, tasks, lengths, budgets or strategies: a batch is formed from the samples of a cell not yet
done); a different model, plan or setting is refused. --report-only rewrites the summary and plots from
what is there (cells then say how many samples they hold).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_TASKS = "niah_single,niah_multikey,vt,kv,copy"
DEFAULT_BUDGETS = "0.05,0.1,0.2"
DEFAULT_MAX_NEW = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kascade eval` (see the module docstring)."""
    from kascade.eval.strategies import STRATEGIES
    from kascade.eval.tasks import TASKS

    parser.add_argument("model_dir", help="local HF model directory (config, weights, tokenizer)")
    parser.add_argument("--plan", help="plan JSON from `kascade calibrate` (needed by kascade, kascade-agnostic, "
                        "kascade-no-remap, kascade-dense-anchors, kascade-sinks, uniform, omnikv)")
    parser.add_argument("--tasks", default=None, help=f"comma-separated, from: {', '.join(TASKS)} "
                        f"(default {DEFAULT_TASKS}; none when --longbench is given)")
    parser.add_argument("--longbench", action="append", default=None, metavar="FILE",
                        help="a LongBench-format JSONL file (repeatable): its first --samples examples, each prompt "
                        "cut to at most every --lengths tokens (the middle of long contexts goes), LongBench's metric")
    parser.add_argument("--lengths", default="4096", help="prompt lengths in tokens, comma-separated (default 4096)")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help=f"top-k fractions rho (default {DEFAULT_BUDGETS})")
    parser.add_argument("--paper-plan", default=None, metavar="FILE",
                        help="plan of the paper's recipe (`kascade calibrate --recipe paper`), needed by kascade-paper")
    parser.add_argument("--strategies", default=None,
                        help="comma-separated, from: " + ", ".join(STRATEGIES) + " (default all but kascade-dense-anchors, "
                        "kascade-sinks and kascade-fp8*, kascade-paper only with --paper-plan; dense always runs)")
    parser.add_argument("--sparse-prefill", default="yes", metavar="{yes,no}",
                        help="yes (default): each strategy is sparse in prefill and decode (the methods as published); "
                        "no: decode-only mode, a dense prefill and sparse decode steps (rows named NAME+dense-prefill; "
                        "what kascade.enable runs by default); e.g. --strategies kascade,kascade+dense-prefill for both")
    parser.add_argument("--samples", type=int, default=10, help="samples per task and length (default 10)")
    parser.add_argument("--batch", type=int, default=None,
                        help="samples of one cell run together (default 16 on CUDA, 1 on the CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that make the prompts ahead of the batches (default: half the cores, at "
                        "most 8, on CUDA; 0 on the CPU: made in this process)")
    parser.add_argument("--out", required=True, help="output folder (results.jsonl, summary.md, plots)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW,
                        help=f"tokens generated for copy/sequence, and the cap of every task (default {DEFAULT_MAX_NEW})")
    parser.add_argument("--k-min", type=int, default=None, help="minimum keys per query (default: the plan's, else 128)")
    parser.add_argument("--haystack", default="filler", choices=["filler", "essay"],
                        help="haystack of the needle and variable-tracking tasks (default filler)")
    parser.add_argument("--data", default=None, help="long text for essay haystacks and copy passages "
                        "(default data/heldout.txt of the repository)")
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    parser.add_argument("--no-coverage", action="store_true", help="skip the attention-mass coverage plot")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch (default: torch's choice)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the summary and plots of the results already in --out")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------


def _split(text: str, what: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError(f"--{what}: expected a comma-separated list, got {text!r}")
    return list(dict.fromkeys(items))


def _ints(text, what):
    try:
        vals = [int(x) for x in _split(text, what)]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"--{what}: expected positive integers, got {text!r}")
    return vals


def _budgets(text):
    try:
        vals = [float(x) for x in _split(text, "budgets")]
    except ValueError:
        raise ValueError(f"--budgets: expected comma-separated fractions like 0.05,0.1, got {text!r}") from None
    bad = [v for v in vals if not 0.0 < v <= 1.0]
    if bad:
        raise ValueError(f"--budgets: expected fractions in (0, 1], got {bad}")
    return vals


def _sparse_prefill(value) -> bool:
    """--sparse-prefill as a bool: "yes" -> True, "no" -> False (True / False pass through)."""
    if isinstance(value, bool):
        return value
    if value in ("yes", "no"):
        return value == "yes"
    raise ValueError(f"--sparse-prefill: expected yes (sparse prefill and decode) or no (dense prefill, sparse "
                     f"decode), got {value!r}")


def _default_data() -> Path:
    return Path(__file__).resolve().parents[2] / "data" / "heldout.txt"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _check_kernels() -> None:
    """On CUDA, --backend auto must find the Triton kernels: without them every sparse step would run the
    reference (pure PyTorch, per sequence), orders of magnitude slower, and nothing would say so."""
    import importlib

    for mode in ("decode", "prefill"):
        try:
            importlib.import_module(f"kascade.kernels.{mode}")
        except ImportError as e:
            raise ValueError(f"--backend: on CUDA the eval runs the Triton kernels, but kascade.kernels.{mode} cannot "
                             f"be imported ({e}); install Triton, or pass --backend reference to accept the slow "
                             "reference path") from e


class _Setup:
    """Everything checked before the model is loaded."""

    def __init__(self, args):
        from kascade.eval.strategies import MECHANISMS, NEEDS_PLAN, STRATEGIES, base_strategy, canonical_strategy
        from kascade.eval.tasks import canonical_task
        from kascade.models import check_model_dir
        from kascade.plan import Plan

        from kascade.eval import longbench as LB

        self.longbench: dict = {}
        for path in getattr(args, "longbench", None) or []:
            examples = LB.load_jsonl(path)
            self.longbench[f"longbench/{Path(path).stem}"] = (Path(path), examples)
        tasks = args.tasks if args.tasks is not None else ("" if self.longbench else DEFAULT_TASKS)
        self.tasks = [canonical_task(t) for t in _split(tasks, "tasks")] if tasks else []
        self.tasks += list(self.longbench)
        paper_path = getattr(args, "paper_plan", None)
        self.sparse_prefill = _sparse_prefill(getattr(args, "sparse_prefill", "yes"))
        names = getattr(args, "strategies", None)
        if names is None:
            names = ",".join(s for s in STRATEGIES if (s != "kascade-paper" or paper_path) and s not in MECHANISMS)
        named = [canonical_strategy(x, self.sparse_prefill) for x in _split(names, "strategies")]
        self.strategies = ["dense"] + [s for s in dict.fromkeys(named) if s != "dense"]
        self.lengths = _ints(args.lengths, "lengths")
        self.budgets = _budgets(args.budgets)
        if isinstance(args.samples, bool) or not isinstance(args.samples, int) or not 1 <= args.samples <= 1_000_000:
            raise ValueError(f"--samples: expected 1..1000000 (evaluation seeds are 0..samples-1), got {args.samples!r}")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
        self.model_dir = check_model_dir(args.model_dir)
        self.plan, self.plan_path = None, None
        if args.plan:
            self.plan_path = Path(args.plan)
            self.plan = Plan.load(self.plan_path)
        need = [s for s in self.strategies if base_strategy(s) in NEEDS_PLAN]
        if need and self.plan is None:
            raise ValueError(f"--plan: strategies {need} need a calibrated plan; pass --plan plan.json (from "
                             "`kascade calibrate`) or leave them out of --strategies")
        self.paper_plan, self.paper_plan_path = None, None
        if paper_path:
            self.paper_plan_path = Path(paper_path)
            self.paper_plan = Plan.load(self.paper_plan_path)
        if any(base_strategy(s) == "kascade-paper" for s in self.strategies) and self.paper_plan is None:
            raise ValueError("--paper-plan: strategy kascade-paper needs the plan of the paper's recipe; pass "
                             "--paper-plan plan.json (from `kascade calibrate --recipe paper`) or leave it out of "
                             "--strategies")
        self.k_min = args.k_min if args.k_min is not None else (self.plan.k_min if self.plan else 128)
        if self.k_min < 1:
            raise ValueError(f"--k-min: expected >= 1, got {self.k_min}")
        self.text, self.data_path = None, None
        if "copy" in self.tasks or args.haystack == "essay":
            self.data_path = Path(args.data) if args.data else _default_data()
            if not self.data_path.is_file():
                raise ValueError(f"--data: no file at {self.data_path}; copy and essay haystacks need a long text "
                                 "file (pass --data FILE)")
            self.text = self.data_path.read_text(encoding="utf-8", errors="replace")
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        max_pos = getattr(cfg, "max_position_embeddings", None)
        if max_pos is not None:
            too_long = [n for n in self.lengths if n + args.max_new_tokens > max_pos]
            if too_long:
                raise ValueError(f"--lengths: {too_long} plus --max-new-tokens {args.max_new_tokens} exceed the model's "
                                 f"max_position_embeddings {max_pos}; use lengths <= {max_pos - args.max_new_tokens}")
        from kascade.models import resolve_device

        self.device = resolve_device(args.device)
        batch = getattr(args, "batch", None)
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
            raise ValueError(f"--batch: expected a positive number of samples, got {batch!r}")
        self.batch = batch if batch is not None else (16 if self.device.type == "cuda" else 1)
        workers = getattr(args, "workers", None)
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
            raise ValueError(f"--workers: expected a number of processes >= 0, got {workers!r}")
        self.workers = workers if workers is not None else (
            min(8, max(1, (os.cpu_count() or 2) // 2)) if self.device.type == "cuda" else 0)
        if self.device.type == "cuda" and args.backend == "auto" and not getattr(args, "report_only", False):
            _check_kernels()
            if args.dtype == "float32":
                print("kascade eval: --dtype float32 on CUDA: the prefill kernels take bfloat16/float16, so every "
                      "sparse prefill runs the reference path (slow); the default dtype is bfloat16", file=sys.stderr)
        self.out = Path(args.out)
        self.identity = {
            "model_dir": str(self.model_dir.resolve()),
            "model_config": _sha(self.model_dir / "config.json"),
            "plan": _sha(self.plan_path) if self.plan_path else None,
            "paper_plan": _sha(self.paper_plan_path) if self.paper_plan_path else None,
            "k_min": self.k_min, "max_new_tokens": args.max_new_tokens, "haystack": args.haystack,
            "data": _sha(self.data_path) if self.data_path else None,
            **{t: _sha(p) for t, (p, _) in self.longbench.items()},
            "device": args.device, "dtype": args.dtype, "backend": args.backend,
        }


# ----------------------------------------------------------------------------------------------
# results file
# ----------------------------------------------------------------------------------------------


def _key(row) -> tuple:
    return (row["task"], int(row["length"]), row["budget"], row["strategy"], int(row["sample"]))


def read_results(path: Path) -> list[dict]:
    """Rows of results.jsonl; a torn last line (interrupted write) is dropped from the file."""
    if not path.is_file():
        return []
    rows, good = [], 0
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            rows.append(json.loads(line))
            good += len(line) + 1
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # only the last line can be torn
                with path.open("r+b") as f:
                    f.truncate(min(good, len(data)))
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON; fix or remove it") from None
    return rows


def _append(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


_ADDABLE = ("paper_plan",)  # only kascade-paper depends on it: may be given later, or left out of a later run


def _check_identity(out: Path, identity: dict) -> None:
    """Refuse an --out folder made with another setting; LongBench files and a paper plan may be added later."""
    path = out / "run.json"
    old = json.loads(path.read_text()) if path.is_file() else {}

    def differs(k, v):
        if k in _ADDABLE:
            return old.get(k) is not None and v is not None and old[k] != v
        return (k in old or not k.startswith("longbench/")) and old.get(k) != v

    diff = {k: (old.get(k), v) for k, v in identity.items() if old and differs(k, v)}
    if diff:
        detail = "; ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"--out: {out} holds results of another setting ({detail}); use a new --out folder")
    merged = {**old, **{k: v for k, v in identity.items() if not (k in _ADDABLE and v is None and old.get(k))}}
    if merged != old:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(merged, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------


def _cells(setup: _Setup) -> list[tuple]:
    """(task, length, budget, strategy) in table order: dense first, then each strategy at each budget."""
    return [(task, length, budget, strategy) for task in setup.tasks for length in setup.lengths
            for strategy in setup.strategies for budget in ([None] if strategy == "dense" else setup.budgets)]


def _n_samples(setup: _Setup, task: str, samples: int) -> int:
    return min(samples, len(setup.longbench[task][1])) if task in setup.longbench else samples


def _jobs(setup: _Setup, samples: int) -> list[tuple]:
    """Every (task, length, budget, strategy, sample) of the grid."""
    return [(*cell, i) for cell in _cells(setup) for i in range(_n_samples(setup, cell[0], samples))]


def _batches(setup: _Setup, samples: int, done: set, batch: int) -> list[tuple]:
    """(task, length, budget, strategy, [samples]) in rounds: round r holds the r-th `batch` samples not yet
    done of every cell (a fresh run: samples [0, B) of every cell, then [B, 2B), ...), so a run cut short
    still fills every cell."""
    per_cell = []
    for cell in _cells(setup):
        todo = [i for i in range(_n_samples(setup, cell[0], samples)) if (*cell, i) not in done]
        per_cell.append((cell, [todo[j : j + batch] for j in range(0, len(todo), batch)]))
    rounds = max((len(chunks) for _, chunks in per_cell), default=0)
    return [(*cell, chunks[r]) for r in range(rounds) for cell, chunks in per_cell if r < len(chunks)]


def _by_length(prompts: list[list[int]]) -> list[list[int]]:
    """Row numbers grouped by prompt length (first appearance order): each group runs as one batch."""
    groups: dict = {}
    for row, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(row)
    return list(groups.values())


def _make_prompt(tok, task, length, i, haystack, text, longbench) -> tuple:
    """(sample, prompt ids) of sample i of `task` at `length` tokens (longbench: task -> examples)."""
    from kascade.eval import longbench as LB
    from kascade.eval import tasks as TK

    if task in longbench:
        sample = LB.make_sample(longbench[task][i], tok, length, task, i)
    else:
        sample = TK.make_task(task, length, tok, i, haystack=haystack, text=text)
    ids = tok(sample.prompt).input_ids
    if task not in longbench and len(ids) != length:
        raise RuntimeError(f"{task}: sample {i} has {len(ids)} tokens, not {length}; please report it")
    return sample, ids


_WORKER: dict = {}


def _worker_init(model_dir: str, haystack: str, data_path, longbench_paths: dict) -> None:
    from transformers import AutoTokenizer

    from kascade.eval import longbench as LB

    _WORKER["tok"] = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    _WORKER["haystack"] = haystack
    _WORKER["text"] = Path(data_path).read_text(encoding="utf-8", errors="replace") if data_path else None
    _WORKER["longbench"] = {t: LB.load_jsonl(p) for t, p in longbench_paths.items()}


def _worker_make(task, length, i):
    w = _WORKER
    return _make_prompt(w["tok"], task, length, i, w["haystack"], w["text"], w["longbench"])


class _Prompts:
    """The run's prompts, made in the order the batches need them: here, or (workers > 0) ahead of their use
    in worker processes, so that the device does not wait for the tokenizer. The same tokenizer files give
    the same prompts either way. Holds the prompts of one task and length, plus the pinned ones."""

    def __init__(self, setup, args, tok, order, workers: int):
        self.tok, self.haystack, self.text = tok, args.haystack, setup.text
        self.longbench = {t: ex for t, (_, ex) in setup.longbench.items()}
        self.order = list(dict.fromkeys(order))
        self.where = {k: j for j, k in enumerate(self.order)}
        self.cache: dict = {}
        self.pinned: dict = {}
        self.futures: dict = {}
        self.next = 0
        self.ahead = 4 * workers
        self.pool = None
        if workers > 0 and self.order:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                initargs=(str(setup.model_dir), args.haystack, str(setup.data_path) if setup.data_path else None,
                          {t: str(p) for t, (p, _) in setup.longbench.items()}))

    def _make_here(self, key):
        return _make_prompt(self.tok, *key, self.haystack, self.text, self.longbench)

    def get(self, task, length, i, pin: bool = False):
        key = (task, length, i)
        for store in (self.pinned, self.cache):
            if key in store:
                return store[key]
        if self.pool is not None:
            upto = self.where.get(key, self.next) + self.ahead
            while self.next < len(self.order) and self.next <= upto:
                k = self.order[self.next]
                self.next += 1
                if k not in self.futures and k not in self.pinned:
                    self.futures[k] = self.pool.submit(_worker_make, *k)
            fut = self.futures.pop(key, None)
            made = self._result(fut) if fut is not None else None
            made = made if made is not None else self._make_here(key)
        else:
            made = self._make_here(key)
        if pin:
            self.pinned[key] = made
            return made
        if any(k[:2] != (task, length) for k in self.cache):
            self.cache.clear()  # prompts can be long: keep those of one task and length
        self.cache[key] = made
        return made

    def _result(self, fut):
        """The worker's prompt; None (prompts made here from now on, said once) when the pool broke down, e.g.
        a script without an `if __name__ == "__main__":` guard, which spawned processes re-run."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            return fut.result()
        except BrokenProcessPool as e:
            print(f"kascade eval: the prompt worker processes failed ({e}); making prompts in this process "
                  "(--workers 0 does so from the start)", file=sys.stderr)
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool, self.futures = None, {}
            return None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _run_batch(model, tok, samples, prompts, strategy, args) -> list[tuple]:
    """Greedy continuations of prompts of one length (lists of ids) with `strategy` (None: dense), scored.

    Returns (score, text, new tokens, seconds) per row; seconds: the batch's time / its rows."""
    import torch

    import kascade
    from kascade.eval import longbench as LB
    from kascade.eval import tasks as TK
    from kascade.eval.generation import greedy_batch

    if len({len(p) for p in prompts}) != 1:
        raise ValueError(f"prompts: a batch runs prompts of one length, got lengths {sorted({len(p) for p in prompts})}")
    limits = [s.max_new_tokens(args.max_new_tokens) if isinstance(s, LB.LongBenchSample)
              else TK.max_new_tokens(s, tok, args.max_new_tokens) for s in samples]
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        if strategy is None:
            outs = greedy_batch(model, ids, limits, [tok.eos_token_id])
        else:
            with kascade.enable(model, strategy=strategy):
                outs = greedy_batch(model, ids, limits, [tok.eos_token_id])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / len(prompts)
    rows = []
    for sample, out, n_new in zip(samples, outs, limits):
        text = tok.decode(out, skip_special_tokens=True)
        if isinstance(sample, LB.LongBenchSample):
            sc = LB.score(sample.example, text)
        else:
            sc = TK.score(sample, text, generated_ids=out, tokenizer=tok, n_expected=n_new)
        rows.append((sc, text, len(out), seconds))
    return rows


def run(args) -> int:
    """Run the evaluation described by `args` (from `add_arguments`); returns 0."""
    import torch

    from kascade.models import load_model

    setup = _Setup(args)
    _check_identity(setup.out, setup.identity)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    results_path = setup.out / "results.jsonl"
    done = {_key(r) for r in read_results(results_path)}
    jobs = _jobs(setup, args.samples)
    batches = [] if getattr(args, "report_only", False) else _batches(setup, args.samples, done, setup.batch)
    want_coverage = not getattr(args, "no_coverage", False) and not (setup.out / "coverage.json").is_file()
    model = tok = prompts = None
    try:
        if batches or want_coverage:
            model, tok = load_model(setup.model_dir, args.device, args.dtype)
            firsts = [(task, length, 0) for task in setup.tasks for length in setup.lengths]
            order = firsts + [(task, length, i) for task, length, _, _, ids in batches for i in ids]
            prompts = _Prompts(setup, args, tok, order, setup.workers if batches else 0)
            for key in firsts:  # fail early on a length a task cannot reach
                prompts.get(*key, pin=True)
        n_runs = _run_batches(setup, args, model, tok, prompts, batches, results_path)
        from kascade.eval import report

        grid = set(jobs)
        rows = [r for r in read_results(results_path) if _key(r) in grid]
        summary = report.summarise(rows, setup.tasks, setup.lengths, setup.budgets, setup.strategies)
        summary["setting"] = setup.identity
        (setup.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (setup.out / "summary.md").write_text(report.markdown(summary))
        report.plot_accuracy(summary, setup.out / "accuracy_vs_budget.png")
        if want_coverage:
            _coverage(setup, model, tok, prompts.get, args)
    finally:
        if prompts is not None:
            prompts.close()
    print(f"kascade eval: {n_runs} new runs in {len(batches)} batches (batch {setup.batch}), {len(rows)} in the "
          f"grid; summary in {setup.out / 'summary.md'}")
    return 0


def _run_batches(setup, args, model, tok, prompts, batches, results_path) -> int:
    """Run every batch, appending its rows to results.jsonl; returns the number of rows run."""
    from tqdm import tqdm

    from kascade.eval.strategies import make_strategy

    n_runs = sum(len(b[4]) for b in batches)
    split = 0
    bar = tqdm(total=n_runs, desc="kascade eval", unit="run", dynamic_ncols=True, disable=not batches)
    for task, length, budget, strategy_name, ids in batches:
        made = [prompts.get(task, length, i) for i in ids]
        strategy = None if strategy_name == "dense" else make_strategy(
            strategy_name, setup.plan, model.config, budget, setup.k_min, backend=args.backend,
            paper_plan=setup.paper_plan)
        groups = _by_length([p for _, p in made])
        split += len(groups) > 1
        for rows in groups:
            bar.set_postfix_str(f"{task}@{length} {strategy_name} {budget if budget is not None else ''} "
                                f"#{ids[rows[0]]}" + (f"-{ids[rows[-1]]}" if len(rows) > 1 else ""))
            res = _run_batch(model, tok, [made[r][0] for r in rows], [made[r][1] for r in rows], strategy, args)
            for r, (sc, text, n_out, seconds) in zip(rows, res):
                _append(results_path, {
                    "task": task, "length": length, "budget": budget, "strategy": strategy_name, "sample": ids[r],
                    "seed": ids[r], "score": sc, "prediction": text[:400], "target": made[r][0].target[:400],
                    "new_tokens": n_out, "seconds": round(seconds, 3)})
            bar.update(len(rows))
    bar.close()
    if split:
        print(f"kascade eval: {split} of {len(batches)} batches held prompts of several lengths and ran as one "
              "batch per length")
    return n_runs


def _coverage(setup, model, tok, sample_of, args) -> None:
    """Coverage of every strategy on the first prompt, at the budget closest to 0.1."""
    import torch

    from kascade.eval import coverage
    from kascade.eval.strategies import make_strategy

    budget = min(setup.budgets, key=lambda b: abs(b - 0.1))
    sample, prompt = sample_of(setup.tasks[0], min(setup.lengths), 0)
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    names = [s for s in setup.strategies if s != "dense"]
    strategies = {s: make_strategy(s, setup.plan, model.config, budget, setup.k_min, backend=args.backend,
                                   paper_plan=setup.paper_plan) for s in names}
    tile = setup.plan.tile if setup.plan is not None else 32
    res = coverage.measure(model, ids, strategies, tile=tile, decode_steps=min(16, ids.shape[1] - 1))
    title = f"coverage, {sample.task} @ {ids.shape[1]} tokens, rho={budget}"
    coverage.plot(res, setup.out / "coverage.png", title=title)
    payload = {"task": sample.task, "length": int(ids.shape[1]), "budget": budget, "k_min": setup.k_min,
               **{mode: {n: a.tolist() for n, a in r.items()} for mode, r in res.items()}}
    (setup.out / "coverage.json").write_text(json.dumps(payload) + "\n")
