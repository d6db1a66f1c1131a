"""Command line: kascade calibrate | generate | eval | bench | demo; `kascade` alone lists them, `--version`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _add_runtime(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")


def _add_prefill_mode(p):
    p.add_argument("--sparse-prefill", choices=["yes", "no"], default=None,
                   help="yes: select in the prompt too (the paper's method: faster prefill, less accurate on formats "
                        "unlike the plan's calibration); no: dense prompt, sparse decode (default: "
                        "kascade.strategy.DEFAULT_SPARSE_PREFILL, decode-only)")


def _prefill_mode(args):
    """--sparse-prefill as kascade.enable's sparse_prefill (None: the library's default)."""
    return None if args.sparse_prefill is None else args.sparse_prefill == "yes"


def _read_prompts(path: Path, tokenizer, length: int, num_prompts: int):
    """Calibration prompts: a .txt file cut into consecutive chunks of `length` tokens, or a .jsonl
    file with one prompt per line in a "text", "context" or "input" field (truncated to `length`)."""
    if not path.is_file():
        raise ValueError(f"--data: no file at {path}")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            text = next((rec[k] for k in ("text", "context", "input") if isinstance(rec.get(k), str)), None)
            if text is None:
                raise ValueError(f"--data: line {n} of {path} has no 'text', 'context' or 'input' string field")
            texts.append(text)
        return texts[:num_prompts]
    import torch

    ids = tokenizer(path.read_text(), add_special_tokens=False).input_ids
    chunks = [torch.tensor(ids[i : i + length]) for i in range(0, len(ids) - length + 1, length)][:num_prompts]
    if not chunks:
        raise ValueError(f"--data: {path} has {len(ids)} tokens, fewer than one prompt of --length {length}")
    return chunks


def _data_provenance(path: Path) -> dict:
    """The calibration data as the plan records it: the file's name and sha256 (no machine path)."""
    import hashlib

    return {"name": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def cmd_calibrate(args) -> int:
    from kascade.calibrate import calibrate_report, save_plots
    from kascade.models import load_model

    recipe = args.recipe
    if args.tolerance is not None and recipe != "output-aware":
        raise ValueError(f"--tolerance: needs --recipe output-aware (the paper's recipe has no divergence), got "
                         f"--recipe {recipe}")
    if args.anchors is None and recipe == "paper":
        raise ValueError("--anchors: the paper's recipe needs the number of anchor layers (layer 0 included)")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise ValueError(f"--num-prompts: expected an integer >= 1, got {args.num_prompts}")
    if args.search_candidates is not None and args.search_candidates < 0:
        raise ValueError(f"--search-candidates: expected an integer >= 1, or 0 for every unit, got "
                         f"{args.search_candidates}")
    if recipe == "paper" and args.anchors != int(args.anchors):
        raise ValueError(f"--anchors: the paper's recipe takes a whole number of anchor layers, got {args.anchors}")
    data = Path(args.data)
    if recipe == "output-aware":
        if not data.is_file():
            raise ValueError(f"--data: no file at {data}")
        if data.suffix != ".txt":
            raise ValueError(f"--data: the output-aware recipe hides facts in a plain .txt file of prose, got {data}")
        if args.search_step is not None and args.search_step < 2:
            raise ValueError(f"--search-step: expected an integer >= 2 (a step removes about 1/N of the units), got "
                             f"{args.search_step}")
    formats = _formats(args.formats) if recipe == "output-aware" else None
    if args.sparse_prefill is not None and recipe != "output-aware":
        raise ValueError(f"--sparse-prefill: needs --recipe output-aware (the paper's recipe judges no outputs), got "
                         f"--recipe {recipe}")
    if args.granularity is not None and recipe != "output-aware":
        raise ValueError(f"--granularity: needs --recipe output-aware (the paper's recipe chooses whole layers), got "
                         f"--recipe {recipe}")
    if args.leave_out is not None:
        from kascade.calibrate.retrieval import formats_without

        if recipe != "output-aware":
            raise ValueError("--leave-out: needs --recipe output-aware")
        formats = formats_without(args.leave_out, formats)
    if recipe == "output-aware":
        _default_output_aware(args, formats)
    elif args.num_prompts is None:
        args.num_prompts = 8
    if recipe == "paper":
        print("kascade calibrate: the paper's recipe judges plans by attention mass, which on SmolLM2-135M kept "
              "85-94% of it while losing half the needles (docs/calibration.md); --recipe output-aware judges them "
              "by the model's own outputs", file=sys.stderr)
    model, tok = load_model(args.model_dir, args.device, args.dtype)
    if recipe == "output-aware" and args.anchors is None and args.tolerance is None:
        _default_target(args, model.config)
    settings = {"recipe": recipe, "length": args.length, "num_prompts": args.num_prompts, "rho": args.rho,
                "k_min": args.k_min, "tile": args.tile, "topk": args.topk, "anchors": args.anchors}
    if recipe == "paper":
        prompts = _read_prompts(data, tok, args.length, args.num_prompts)
        plan, report = calibrate_report(model, prompts, int(args.anchors), tokenizer=tok, max_length=args.length,
                                        rho=args.rho, k_min=args.k_min, tile=args.tile, topk=args.topk,
                                        data_name=_data_provenance(data), tp_degree=args.tp_degree)
        plots = save_plots(report, args.plots or Path(args.output).with_suffix(""))
    else:
        from kascade.calibrate.output_aware import calibrate_output_aware, save_search_plot

        sparse_prefill = args.sparse_prefill != "no"  # judged with the prompt selected unless told otherwise
        settings.update(tolerance=args.tolerance, answer_tokens=args.answer_tokens, batch_size=args.batch_size,
                        search_step=args.search_step, search_candidates=args.search_candidates, formats=list(formats),
                        objective=args.objective, leave_out=args.leave_out, granularity=args.granularity or "head",
                        sources=args.sources, statistics=args.statistics,
                        sparse_prefill=sparse_prefill, default_target=args.default_target)
        plan, report = calibrate_output_aware(model, tok, data.read_text(encoding="utf-8", errors="replace"),
                                              num_anchors=args.anchors, tolerance=args.tolerance, length=args.length,
                                              num_prompts=args.num_prompts, answer_tokens=args.answer_tokens,
                                              batch_size=args.batch_size, rho=args.rho, k_min=args.k_min,
                                              tile=args.tile, topk=args.topk, data_name=_data_provenance(data),
                                              shrink=args.search_step, formats=formats, objective=args.objective,
                                              candidates=args.search_candidates, leave_out=args.leave_out,
                                              tp_degree=args.tp_degree, granularity=args.granularity or "head",
                                              sources=args.sources, statistics=args.statistics,
                                              sparse_prefill=sparse_prefill)
        folder = Path(args.plots or Path(args.output).with_suffix(""))
        folder.mkdir(parents=True, exist_ok=True)
        plots = [save_search_plot(report, folder / "divergence_vs_cost.png")]
        for name, plans in (("output-aware", report["plans_along"]), ("paper", report["paper_plans_along"])):
            for cost, p in plans.items():  # the search path's plans, for accuracy-against-cost comparisons
                p.save(folder / f"{name}-{cost}.json")
    plan.provenance["settings"] = settings
    plan.save(args.output)
    print(f"anchors {plan.anchors}; plan written to {args.output}; plots: {', '.join(plots)}")
    _print_cost(plan, report)
    if recipe == "output-aware":
        _warn_if_unvalidated(report)
    if args.tp_degree > 1 and recipe == "output-aware":
        print(f"tp_degree {args.tp_degree}: every head source stays inside its tensor-parallel shard")
    elif args.tp_degree > 1:
        tp = report["tp"]
        print(f"tp_degree {args.tp_degree}: head map kept inside shards; objective {tp['objective']:.4f} vs "
              f"{tp['objective_unconstrained']:.4f} unconstrained ({100 * tp['objective_loss']:.2f}% lost), mean "
              f"coverage {tp['coverage']:.4f} vs {tp['coverage_unconstrained']:.4f}")
    return 0


def _default_output_aware(args, formats) -> None:
    """Fill the output-aware recipe's unset search settings with the validated defaults
    (kascade.calibrate.output_aware.DEFAULT_*)."""
    from kascade.calibrate import output_aware as oa

    if args.num_prompts is None:
        args.num_prompts = oa.default_num_prompts(formats)
    if args.search_step is None:
        args.search_step = oa.DEFAULT_SEARCH_STEP
    if args.search_candidates is None:
        args.search_candidates = oa.DEFAULT_CANDIDATES
    elif args.search_candidates == 0:  # 0: every unit at every step
        args.search_candidates = None
    args.default_target = False


def _default_target(args, config) -> None:
    """The default stopping rule: a third of the layers in selecting-layer equivalents; says what and why."""
    from kascade.calibrate import output_aware as oa
    from kascade.plan import model_fingerprint

    fp = model_fingerprint(config)
    args.anchors, args.default_target = oa.default_target(fp["num_layers"], fp["num_kv_heads"]), True
    print(f"kascade calibrate: output-aware recipe on {args.num_prompts} prompts of {args.length} tokens "
          f"({args.formats} formats, {args.objective} objective); the search stops at {args.anchors:.2f} of "
          f"{fp['num_layers']} selecting-layer equivalents, a third of the layers: the cost at which "
          "leave-one-format-out plans kept dense accuracy on formats their calibration never saw "
          "(docs/calibration.md). --anchors N or --tolerance T chooses otherwise.", file=sys.stderr)


def _warn_if_unvalidated(report) -> None:
    """A worst-family divergence above the validated plans' is worth an accuracy check on the user's format."""
    from kascade.calibrate.output_aware import VALIDATED_WORST_FAMILY_KL

    fams = report.get("divergence_by_family") or {}
    if not fams:
        return
    family, worst = max(fams.items(), key=lambda kv: kv[1])
    if worst > VALIDATED_WORST_FAMILY_KL:
        print(f"kascade calibrate: warning: the plan's worst format family ({family}) diverges by {worst:.4f} nats, "
              f"above the {VALIDATED_WORST_FAMILY_KL} of the plans validated on formats they never saw; check its "
              "accuracy on your own format (kascade eval) or allow a larger cost (--anchors)", file=sys.stderr)


def _formats(spec: str) -> tuple[str, ...]:
    """--formats: "mixture" (every calibration format), "prose" (the prose formats) or a comma list."""
    from kascade.calibrate.retrieval import FORMATS, MIXTURE

    named = {"mixture": MIXTURE, "prose": FORMATS}
    if spec in named:
        return named[spec]
    chosen = tuple(f.strip() for f in spec.split(",") if f.strip())
    bad = [f for f in chosen if f not in MIXTURE]
    if bad or not chosen:
        raise ValueError(f"--formats: expected 'mixture', 'prose' or a comma list of {', '.join(MIXTURE)}; got {spec!r}")
    return chosen


def _print_cost(plan, report) -> None:
    """Selecting-layer equivalents, predicted attention speedups and, for output-aware plans, the divergence."""
    from kascade.costmodel import predicted_speedup

    sp = predicted_speedup(plan)
    print(f"selecting-layer equivalents {plan.selecting_layers_equivalent:.2f} of {plan.num_layers}; predicted "
          f"attention speedup from the H200 kernel table at 128K: decode {sp['decode']:.2f}x, prefill "
          f"{sp['prefill']:.2f}x")
    if "divergence" in report:
        print(f"divergence on the calibration prompts: {report['divergence']:.4f} nats (answer agreement "
              f"{100 * report['agreement']:.1f}%); the paper's recipe at {len(report['paper_anchors'])} anchors "
              f"{report['paper_anchors']}: {report['paper_divergence']:.4f} nats "
              f"({100 * report['paper_agreement']:.1f}%)")
    if report.get("divergence_by_family"):
        fams = ", ".join(f"{f} {v:.4f}" for f, v in report["divergence_by_family"].items())
        print(f"divergence per format family ({report['objective']} objective): {fams}")


def cmd_generate(args) -> int:
    import torch

    import kascade
    from kascade.models import load_model
    from kascade.plan import Plan

    path = Path(args.prompt_file)
    if not path.is_file():
        raise ValueError(f"--prompt-file: no file at {path}")
    model, tok = load_model(args.model_dir, args.device, args.dtype)
    plan = None if args.dense else Plan.load(args.plan)
    ids = tok(path.read_text(), return_tensors="pt").input_ids.to(next(model.parameters()).device)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    t0 = time.perf_counter()
    with torch.no_grad():
        if plan is None:
            out = model.generate(ids, **gen)
        else:
            with kascade.enable(model, plan, backend=args.backend, sparse_prefill=_prefill_mode(args)):
                out = model.generate(ids, **gen)
    dt = time.perf_counter() - t0
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"[{'dense' if plan is None else 'kascade'}: {ids.shape[1]} prompt tokens, "
          f"{out.shape[1] - ids.shape[1]} new tokens, {dt:.2f} s]", file=sys.stderr)
    return 0


def _int_list(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{name}: expected positive integers, got {text!r}")
    return vals


def cmd_bench(args) -> int:
    from kascade import bench

    target = Path(args.model)
    if not (target.is_dir() or (target.is_file() and target.suffix == ".json")):
        raise ValueError(f"MODEL_DIR_OR_CONFIG: {args.model!r} is neither a local model directory nor a config "
                         ".json file (a config runs random weights of that shape)")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    bad = [p for p in providers if p not in ("none", "dense", "kascade")]
    if bad:
        raise ValueError(f"--providers: expected a subset of none,dense,kascade, got {bad}")
    anchors = _int_list(args.anchors, "--anchors") if args.anchors else None
    if anchors is not None and args.anchors.split(",")[0].strip() != "0":
        raise ValueError(f"--anchors: expected a list starting at layer 0, got {args.anchors!r}")
    bench.run(args.model, _int_list(args.lengths, "--lengths"), _int_list(args.batch, "--batch"),
              new_tokens=args.new_tokens, output=args.output, device=args.device, dtype=args.dtype,
              anchors=anchors, plan_path=args.plan, providers=providers, repeats=args.repeats,
              kernels=not args.no_kernels, backend=args.backend,
              profile=[p.strip() for p in (args.profile or "").split(",") if p.strip()], decode_only=args.decode_only)
    print(Path(args.output).with_suffix(".md").read_text())
    return 0


def cmd_demo(args) -> int:
    from kascade.demo import run_demo

    run_demo(args.model, args.plan, length=args.length, new_tokens=args.new_tokens, device=args.device,
             sparse_prefill=_prefill_mode(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kascade import __version__

    parser = argparse.ArgumentParser(prog="kascade", description="Kascade sparse attention for long-context LLMs",
                                     epilog="`kascade` alone lists the commands; `kascade COMMAND -h` gives a "
                                            "command's options")
    parser.add_argument("--version", action="version", version=f"kascade {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("calibrate", help="choose anchors and head map for a model; writes a plan JSON and plots")
    p.add_argument("model_dir", help="local HF model directory")
    p.add_argument("--data", required=True, help=".txt (cut into prompts) or .jsonl (text/context field per line)")
    p.add_argument("--recipe", default="output-aware", choices=["paper", "output-aware"],
                   help="output-aware (default): (layer, KV head) units chosen greedily by the divergence of the "
                        "model's own next-token distributions on retrieval prompts in many formats built from --data; "
                        "paper: anchors by attention-mass coverage (the paper's DP)")
    p.add_argument("--anchors", type=float, default=None,
                   help="paper: number of anchor layers, layer 0 included (required); output-aware: the "
                        "selecting-layer equivalents to reach (selecting KV heads / KV heads, summed over layers; "
                        "default: a third of the layers, the validated stopping rule)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="output-aware: the cheapest plan whose divergence (nats, KL from dense) stays under this")
    p.add_argument("--answer-tokens", type=int, default=8,
                   help="output-aware: dense continuation tokens followed per prompt (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="output-aware: prompts per forward (default 8)")
    p.add_argument("--search-step", type=int, default=None,
                   help="output-aware: each search step removes about 1/N of the remaining units (default 5; "
                        "a smaller N measures fewer plans: faster, coarser)")
    p.add_argument("--search-candidates", type=int, default=None,
                   help="output-aware: after the first step, measure only the N units whose removal cost least "
                        "when last measured (default 10; 0: every unit at every step)")
    p.add_argument("--formats", default="mixture",
                   help="output-aware: calibration formats: 'mixture' (default: prose needles, chat, prose, records, "
                        "JSON, tables, code, documents, long chats), 'prose', or a comma list")
    p.add_argument("--objective", default="worst-family", choices=["worst-family", "mean"],
                   help="output-aware: what the search keeps low: the largest mean divergence of a format family "
                        "(default) or the mean over prompts")
    p.add_argument("--sources", default="mean", choices=["mean", "worst-family"],
                   help="output-aware: how a reusing head picks the selecting head it reads: highest similarity "
                        "averaged over the prompts (default) or highest on the format family it serves worst")
    p.add_argument("--statistics", default="prompt", choices=["prompt", "answer"],
                   help="output-aware: where the similarity between heads is measured: every tile of the prompt "
                        "(default, the paper's) or the question's end and the dense answer (the retrieving queries)")
    p.add_argument("--leave-out", default=None,
                   help="output-aware: calibrate without the formats of this evaluation family (leave-one-family-out "
                        "validation): records, json_records, table, code, multi_doc, chat_history")
    p.add_argument("--granularity", default=None, choices=["head", "layer"],
                   help="output-aware: what the search adds or removes: (layer, KV head) units (head, the default) or "
                        "whole layers (layer: anchors and the paper's head map, a plan every path runs)")
    p.add_argument("--sparse-prefill", choices=["yes", "no"], default=None,
                   help="output-aware: the mode plans are judged in: yes (default: the prompt selected too, the "
                        "stricter test, a plan for both modes) or no (decode-only mode, kascade.enable's default: "
                        "possibly cheaper plans, for that mode only)")
    p.add_argument("-o", "--output", required=True, help="plan JSON to write")
    p.add_argument("--length", type=int, default=4096, help="tokens per calibration prompt (default 4096)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="paper: at most this many prompts (default 8); output-aware: this many, cycling the formats "
                        "(default: two per format)")
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--k-min", type=int, default=128)
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--topk", type=int, default=64, help="top-k size of the calibration statistics (default 64)")
    p.add_argument("--plots", help="folder for the PNG plots (default: next to the plan)")
    p.add_argument("--tp-degree", type=int, default=1,
                   help="tensor-parallel ranks the plan must run on: the head map stays inside each rank's "
                        "KV heads (default 1)")
    _add_runtime(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("generate", help="greedy generation with Kascade attention")
    p.add_argument("model_dir")
    p.add_argument("--plan", help="plan JSON (from kascade calibrate)")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dense", action="store_true", help="dense attention instead (for comparison)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    _add_prefill_mode(p)
    _add_runtime(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="time to first token and decode tokens/s, dense vs Kascade (CUDA graphs; "
                                     "Kascade with its sparse prefill)")
    p.add_argument("model", metavar="MODEL_DIR_OR_CONFIG",
                   help="local HF model directory, or a config .json (random weights of that shape)")
    p.add_argument("--lengths", default="32768,131072", help="context lengths (default 32768,131072)")
    p.add_argument("--batch", default="1,4", help="batch sizes (default 1,4)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (default 64)")
    p.add_argument("--plan", help="plan JSON (default: anchors below, identity head map)")
    p.add_argument("--anchors", help="comma-separated anchor layers (default: 0,2,8,13,14 for 32 layers, "
                                     "else 5 uniform)")
    p.add_argument("--providers", default="none,dense,kascade",
                   help="subset of none,dense,kascade (none = attention removed, for the attention share)")
    p.add_argument("--repeats", type=int, help="TTFT repeats (default 3, 1 when batch x length >= 64K)")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-layer kernel prediction")
    p.add_argument("--decode-only", action="store_true",
                   help="no prefill: fill the cache with random keys/values and time decode only (fast)")
    p.add_argument("--profile", help="providers whose prefill is profiled once more (top GPU kernels), e.g. kascade")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("-o", "--output", default="benchmarks/results/bench",
                   help="results prefix: writes .json, .md and .png (default benchmarks/results/bench)")
    _add_runtime(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="dense vs Kascade on the embedded default model: agreement and time")
    p.add_argument("--model", help="model directory (default: models/smollm2-135m-instruct, else models/kascade-tiny, "
                                   "else a random tiny Llama)")
    p.add_argument("--plan", help="plan JSON (default: the shipped plan of the model)")
    p.add_argument("--length", type=int, help="prompt tokens (default 4096 on a GPU, 2048 on the CPU)")
    p.add_argument("--new-tokens", type=int, help="answer tokens (default 32 for a chat question, else 16)")
    p.add_argument("--device", default="auto")
    _add_prefill_mode(p)
    p.set_defaults(func=cmd_demo)

    try:
        from kascade.eval import command as eval_command
    except ImportError:
        eval_command = None
    if eval_command is not None and hasattr(eval_command, "add_arguments"):
        p = sub.add_parser("eval", help="accuracy of strategies on generated long-context tasks")
        eval_command.add_arguments(p)
        p.set_defaults(func=eval_command.run)
    return parser


def commands_help(parser: argparse.ArgumentParser) -> str:
    """What `kascade` with no arguments prints: usage, then each command with its help on one line."""
    from kascade import __version__

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = [(a.dest, a.help or "") for a in sub._choices_actions]
    width = max(len(name) for name, _ in rows)
    lines = [f"usage: kascade COMMAND [options]   (kascade {__version__}; kascade COMMAND -h for a command's options)",
             "", f"{parser.description}. Commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a first look, not an error: the commands, exit status 0
        print(commands_help(parser))
        return 0
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "generate" and not args.dense and not args.plan:
        print("kascade generate: error: --plan is required (or --dense)", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"kascade {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
