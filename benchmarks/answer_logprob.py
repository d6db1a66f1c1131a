"""Where a budget's or a plan's loss arises: the log-probability of the expected answer, teacher-forced.

For each family, prompts of the evaluation task (seeds from --first-seed, outside the range the
evaluation tables use) are prefilled with each strategy, then the expected answer's tokens are fed as
decode steps (kascade.calibrate.output_aware.follow), and the log-probability of every answer token is
summed. Unlike an accuracy cell (0 or 1 a sample), this is a continuous measure, so a few prompts tell
apart where a loss arises, e.g. per-layer top-k with a sparse prefill (`oracle`) against the same with a
dense prefill (`oracle+dense-prefill`, decode-only mode): if the second recovers dense, the loss comes
from the prefill's selection, not from the decode steps'.

    python benchmarks/answer_logprob.py MODEL_DIR --plan plans/smollm2-135m-instruct.json \\
        --strategies dense,oracle,oracle+dense-prefill,kascade,kascade+dense-prefill \\
        --families json_records,log_lookup --samples 8 -o OUT --device cpu
    python benchmarks/answer_logprob.py MODEL_DIR --plan six=A.json ten=B.json \\
        --strategies dense,six:kascade+dense-prefill,ten:kascade+dense-prefill ... --against ten:kascade+dense-prefill
        several plans in one run (LABEL=FILE; a strategy LABEL:NAME runs with that plan, one without a label with
        the first)
    python benchmarks/answer_logprob.py --merge six=A.json ten=B.json -o OUT [--against ten:kascade]
        one table from runs over the same prompts (e.g. one per plan), strategies named LABEL:strategy

Dense and the decode-only strategies of Kascade and per-layer top-k (`kascade+dense-prefill`,
`oracle+dense-prefill`) attend the prompt densely, so they share one dense prompt pass per prompt and run only
their decode steps (kascade.calibrate.output_aware.follow_cached).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from report_json import repo_relative  # noqa: E402  (benchmarks/, beside this file)


def paired(values: dict, name: str, base: str = "dense") -> tuple[float, float]:
    """Mean and standard error over samples of values[name] - values[base] (lists in sample order)."""
    d = [a - b for a, b in zip(values[name], values[base])]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, math.sqrt(var / len(d))


TAIL = "+dense-tail"


def with_dense_tail(strategy, tail: int):
    """`strategy`, except that in a prefill step (more than `tail` queries) the last `tail` query positions
    attend densely to every key (their rows of the output replaced by dense attention's)."""
    import inspect

    from kascade import ops

    sparse = strategy.attend
    takes_len = "kv_len" in inspect.signature(sparse).parameters

    def attend(layer, q, k, v, kv_start, scale, kv_len=None):
        if kv_len is not None and not takes_len:
            raise ValueError(f"kv_len: {type(strategy).__name__} does not take a preallocated cache's lengths")
        out = sparse(layer, q, k, v, kv_start, scale, **({"kv_len": kv_len} if takes_len else {}))
        if q.shape[2] > tail:
            out[:, :, -tail:] = ops.dense(q[:, :, -tail:], k, v, kv_start=kv_start, scale=scale,
                                          backend=strategy.backend, kv_len=kv_len)
        return out

    strategy.attend = attend
    return strategy


LAYER_BUDGETS = "oracle-layer-budgets"  # per-layer top-k with the budgets of --layer-budgets (kascade.eval.layer_budgets)
TOP_P = "oracle-top-p"  # per-layer top-p with the p of --top-p (kascade.eval.top_p); +dense-prefill: decode-only


SHARES_DENSE_PROMPT = ("kascade", "oracle")  # base strategies whose decode-only mode attends the prompt densely,
# keeping no state from it


def shares_dense_prompt(name: str, strategy) -> bool:
    """Whether the strategy of a --strategies name attends the prompt exactly as dense does, so it can start from
    dense's prompt pass: dense, and the decode-only Kascade and per-layer top-k."""
    from kascade.eval.strategies import DENSE_PREFILL

    base = name.rpartition(":")[2]
    return base == "dense" or (base.endswith(DENSE_PREFILL) and base[: -len(DENSE_PREFILL)] in SHARES_DENSE_PROMPT
                               and getattr(strategy, "sparse_prefill", True) is False)


def parse_plans(items: list[str]) -> dict[str, str]:
    """--plan's items: one FILE (label "") or LABEL=FILE items (labels unique)."""
    if len(items) == 1 and "=" not in items[0]:
        return {"": items[0]}
    out = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path or ":" in label:
            raise SystemExit(f"--plan: expected one FILE or LABEL=FILE items (a label without ':'), got {item!r}")
        if label in out:
            raise SystemExit(f"--plan: label {label!r} given twice")
        out[label] = path
    return out


def plan_of(name: str, plans: dict):
    """(the plan a --strategies name runs with, the name without its label): LABEL:NAME takes plan LABEL, a name
    without a label the first plan."""
    label, sep, base = name.rpartition(":")
    if not sep:
        return next(iter(plans.values())), name
    if label not in plans:
        raise SystemExit(f"--strategies: {name!r} names plan {label!r}; --plan gives {sorted(k for k in plans if k)}")
    return plans[label], base


def build(name: str, plan, model_config, rho: float, layer_budgets=None, top_p=None):
    """The strategy of a name of --strategies (kascade.eval.strategies names, oracle-layer-budgets or
    oracle-top-p[+dense-prefill], optionally ending in +dense-tailW)."""
    from kascade.eval.strategies import DENSE_PREFILL, make_strategy

    base, _, tail = name.partition(TAIL)
    if base in (TOP_P, TOP_P + DENSE_PREFILL):
        from kascade.eval import top_p as TPM

        if top_p is None:
            raise SystemExit(f"--strategies: {base} needs --top-p FILE (python -m kascade.eval.top_p)")
        strategy = TPM.TopPStrategy(base, TPM.load(top_p), rho, plan.k_min, plan.tile,
                                    sparse_prefill=base == TOP_P)
    elif base == LAYER_BUDGETS:
        from kascade.eval import layer_budgets as LB

        if layer_budgets is None:
            raise SystemExit(f"--strategies: {LAYER_BUDGETS} needs --layer-budgets FILE (python -m "
                             "kascade.eval.layer_budgets)")
        strategy = LB.LayerBudgetStrategy(base, LB.load(layer_budgets), plan.k_min, plan.tile)
        strategy.validate(model_config)
    else:
        strategy = make_strategy(base, plan, model_config, rho, plan.k_min)
    if not tail:
        return strategy
    if not tail.isdigit() or int(tail) < 1:
        raise SystemExit(f"--strategies: expected NAME{TAIL}W with W a positive integer, got {name!r}")
    return with_dense_tail(strategy, int(tail))


MERGE_KEYS = ("length", "samples", "rho", "first_seed")  # what runs must share to be merged


def merge(runs: dict) -> dict:
    """One result from several runs over the same prompts (label -> result JSON), e.g. one run per plan: every
    strategy but dense becomes LABEL:strategy, `plan` becomes {label: plan}. The runs must share MERGE_KEYS,
    their families and dense's values (the same prompts), else ValueError names what differs."""
    if len(runs) < 2:
        raise ValueError(f"merge: expected at least two LABEL=JSON runs, got {len(runs)}")
    labels = list(runs)
    first = runs[labels[0]]
    out = {k: first[k] for k in MERGE_KEYS}
    out.update({k: first[k] for k in ("device", "dtype", "torch", "transformers", "date") if k in first})
    out["plan"] = {label: r["plan"] for label, r in runs.items()}
    out["strategies"] = ["dense"]
    out["families"] = {fam: {"logprob": {"dense": v["logprob"]["dense"]}, "first_ok": {"dense": v["first_ok"]["dense"]}}
                       for fam, v in first["families"].items()}
    for label, r in runs.items():
        for k in MERGE_KEYS:
            if r[k] != first[k]:
                raise ValueError(f"merge: {k} of {label} is {r[k]!r}, of {labels[0]} {first[k]!r}")
        if list(r["families"]) != list(first["families"]):
            raise ValueError(f"merge: families of {label} are {list(r['families'])}, of {labels[0]} "
                             f"{list(first['families'])}")
        for fam, v in r["families"].items():
            dense, ref = v["logprob"]["dense"], first["families"][fam]["logprob"]["dense"]
            if any(abs(a - b) > 1e-3 for a, b in zip(dense, ref)) or len(dense) != len(ref):
                raise ValueError(f"merge: dense log-probabilities of {label} on {fam} differ from {labels[0]}'s "
                                 "(not the same prompts, model or dtype)")
        for name in r["strategies"]:
            if name == "dense":
                continue
            tagged = f"{label}:{name}"
            out["strategies"].append(tagged)
            for fam, v in r["families"].items():
                for field in ("logprob", "first_ok"):
                    out["families"][fam][field][tagged] = v[field][name]
                if name in v.get("key_share", {}):
                    out["families"][fam].setdefault("key_share", {})[tagged] = v["key_share"][name]
    return out


def _plans_text(plan) -> str:
    """'plan FILE', or 'plans LABEL FILE, ...' for a merged result."""
    if isinstance(plan, dict):
        return "plans " + ", ".join(f"{label}: {path}" for label, path in plan.items())
    return f"plan {plan}"


def markdown(result: dict, against: str | None = None) -> str:
    """The table against dense; with `against` (a strategy of the run), also each other sparse strategy paired
    against that one on the same prompts."""
    names = result["strategies"]
    lines = [f"# Teacher-forced answer log-probability, {result['length']} tokens, rho {result['rho']}", "",
             f"{result['device']}, {result['dtype']}"
             + (f", torch {result['torch']}, transformers {result['transformers']}, {result['date']}" if "date" in result
                else "") + "; `benchmarks/answer_logprob.py` (held-out seeds from "
             f"{result['first_seed']}, {result['samples']} prompts per family; {_plans_text(result['plan'])}). Sum over the "
             "answer's tokens of log p (nats); difference against dense: mean ± standard error over the same prompts; "
             "first token: share of prompts whose first answer token is the argmax.", "",
             "| family | strategy | log p(answer) | - dense | first token |", "|---|---|---|---|---|"]
    for fam, v in result["families"].items():
        for name in names:
            m, se = paired(v["logprob"], name)
            mean = sum(v["logprob"][name]) / len(v["logprob"][name])
            first = sum(v["first_ok"][name]) / len(v["first_ok"][name])
            lines.append(f"| {fam} | {name} | {mean:.2f} | {m:+.2f} ± {se:.2f} | {first:.2f} |")
    shares = {(fam, n): x for fam, v in result["families"].items() for n, x in v.get("key_share", {}).items()}
    if shares:
        lines += ["", "Keys kept over the keys uniform top-k at rho keeps on the same steps (the steps the strategy "
                  "selects on: the prompt's tiles and the answer's decode steps with the sparse prefill, the decode "
                  "steps alone in decode-only mode):", "",
                  "| family | strategy | key share |", "|---|---|---|"]
        lines += [f"| {fam} | {n} | {x:.3f} |" for (fam, n), x in shares.items()]
    if against is not None:
        if against not in names:
            raise ValueError(f"against: expected one of the run's strategies {names}, got {against!r}")
        lines += ["", f"## Against {against}", "", f"Paired difference against {against} on the same prompts "
                  "(mean ± standard error, nats) and the prompts where the strategy is higher:", "",
                  f"| family | strategy | - {against} | higher |", "|---|---|---|---|"]
        for fam, v in result["families"].items():
            for name in names:
                if name in ("dense", against):
                    continue
                m, se = paired(v["logprob"], name, against)
                up = sum(a > b for a, b in zip(v["logprob"][name], v["logprob"][against]))
                lines.append(f"| {fam} | {name} | {m:+.3f} ± {se:.3f} | {up} / {len(v['logprob'][name])} |")
    return "\n".join(lines) + "\n"


def write(result: dict, stem, against: str | None = None) -> None:
    """stem.json (the result) and stem.md (its table)."""
    out = Path(stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result, against))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", nargs="?", help="the model (not with --report)")
    ap.add_argument("--plan", nargs="+", default=[str(ROOT / "plans" / "smollm2-135m-instruct.json")],
                    help="one plan FILE, or LABEL=FILE items for strategies named LABEL:NAME")
    ap.add_argument("--strategies", default="dense,oracle,oracle+dense-prefill,kascade,kascade+dense-prefill")
    ap.add_argument("--families", default="json_records,log_lookup")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--first-seed", type=int, default=950_000)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--layer-budgets", default=None, help="per-layer budgets for oracle-layer-budgets")
    ap.add_argument("--top-p", default=None, help="the calibrated p for oracle-top-p (python -m kascade.eval.top_p)")
    ap.add_argument("-o", "--output", required=True, help="output stem (.json, .md)")
    ap.add_argument("--against", default=None, help="also pair every sparse strategy against this one")
    ap.add_argument("--report", default=None, metavar="JSON", help="only rewrite the .md of a measured JSON")
    ap.add_argument("--merge", nargs="+", default=None, metavar="LABEL=JSON",
                    help="only merge runs over the same prompts (e.g. one per plan) into one table")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    if args.merge:
        runs = {}
        for item in args.merge:
            label, sep, path = item.partition("=")
            if not sep or not label or not path:
                ap.error(f"--merge: expected LABEL=JSON, got {item!r}")
            runs[label] = json.loads(Path(path).read_text())
        write(merge(runs), args.output, args.against)
        return 0
    if args.report:
        result = json.loads(Path(args.report).read_text())
        Path(args.output).with_suffix(".md").write_text(markdown(result, args.against))
        return 0
    if args.model_dir is None:
        ap.error("model_dir: expected the model's folder (only --report runs without it)")

    import torch
    import transformers
    from tqdm.auto import tqdm

    import kascade
    from kascade.calibrate.output_aware import _forward, follow, follow_cached
    from kascade.eval.tasks import make_task
    from kascade.models import load_model
    from kascade.plan import Plan

    names = args.strategies.split(",")
    if "dense" not in names:
        raise SystemExit(f"--strategies: expected dense among them (the differences are against it), got {names}")
    model, tok = load_model(args.model_dir, args.device, args.dtype)
    plan_files = parse_plans(args.plan)
    plans = {label: Plan.load(path) for label, path in plan_files.items()}
    strategies = {}
    for n in names:
        plan, base = plan_of(n, plans)
        strategies[n] = build(base, plan, model.config, args.rho, args.layer_budgets, args.top_p)
    shared = [n for n in names if shares_dense_prompt(n, strategies[n])]
    device = next(model.parameters()).device
    result = {"length": args.length, "samples": args.samples, "rho": args.rho, "first_seed": args.first_seed,
              "plan": repo_relative(plan_files[""]) if "" in plan_files else
              {label: repo_relative(path) for label, path in plan_files.items()}, "strategies": names,
              **({"layer_budgets": repo_relative(args.layer_budgets)} if args.layer_budgets else {}),
              **({"top_p": repo_relative(args.top_p)} if args.top_p else {}), "device": str(device) if device.type == "cpu"
              else torch.cuda.get_device_name(device), "dtype": str(next(model.parameters()).dtype),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "date": datetime.date.today().isoformat(), "families": {}}
    for fam in args.families.split(","):
        logprob = {n: [] for n in names}
        first_ok = {n: [] for n in names}
        for st in strategies.values():  # strategies that count their keys (top-p) count this family's alone
            if hasattr(st, "key_share"):
                st.kept = st.uniform = 0
        for i in tqdm(range(args.samples), desc=fam, unit="prompt"):
            s = make_task(fam, args.length, tok, seed=args.first_seed + i)
            ids = tok(s.prompt).input_ids
            target = tok(s.prompt + s.target).input_ids[len(ids):]
            prompt = torch.tensor([ids], device=device)
            cont = torch.tensor([target], device=device)
            if shared:  # one dense prompt pass for dense and the decode-only strategies
                with torch.no_grad(), kascade.enable(model, strategy=strategies["dense"]):
                    logits, cache = _forward(model, prompt, None)
                first = torch.log_softmax(logits, dim=-1)
            for n in names:
                with kascade.enable(model, strategy=strategies[n]):
                    if n in shared:
                        lp, cache = follow_cached(model, cache, first, cont)
                    else:
                        _, lp = follow(model, prompt, len(target), cont)
                picked = lp[0].gather(-1, cont[0][:, None])[:, 0]
                logprob[n].append(float(picked.sum()))
                first_ok[n].append(bool(lp[0, 0].argmax() == cont[0, 0]))
        result["families"][fam] = {"logprob": logprob, "first_ok": first_ok}
        shares = {n: st.key_share() for n, st in strategies.items() if hasattr(st, "key_share")}
        if shares:  # keys kept over uniform top-k's on the steps the strategy selected on
            result["families"][fam]["key_share"] = shares
        write(result, args.output, args.against)  # after every family: a cut run keeps what it measured
    print(markdown(result, args.against))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
