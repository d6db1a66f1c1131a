"""Command line: kascade calibrate | generate | eval | bench | demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _add_runtime(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")


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


def cmd_calibrate(args) -> int:
    from kascade.calibrate import calibrate_report, save_plots
    from kascade.models import load_model

    model, tok = load_model(args.model_dir, args.device, args.dtype)
    prompts = _read_prompts(Path(args.data), tok, args.length, args.num_prompts)
    plan, report = calibrate_report(model, prompts, args.anchors, tokenizer=tok, max_length=args.length,
                                    rho=args.rho, k_min=args.k_min, tile=args.tile, topk=args.topk,
                                    data_name=str(args.data), tp_degree=args.tp_degree)
    plan.save(args.output)
    plots = save_plots(report, args.plots or Path(args.output).with_suffix(""))
    print(f"anchors {plan.anchors}; plan written to {args.output}; plots: {', '.join(plots)}")
    if args.tp_degree > 1:
        tp = report["tp"]
        print(f"tp_degree {args.tp_degree}: head map kept inside shards; objective {tp['objective']:.4f} vs "
              f"{tp['objective_unconstrained']:.4f} unconstrained ({100 * tp['objective_loss']:.2f}% lost), mean "
              f"coverage {tp['coverage']:.4f} vs {tp['coverage_unconstrained']:.4f}")
    return 0


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
            with kascade.enable(model, plan, backend=args.backend):
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

    run_demo(args.model, args.plan, length=args.length, new_tokens=args.new_tokens, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kascade", description="Kascade sparse attention for long-context LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="choose anchors and head map for a model; writes a plan JSON and plots")
    p.add_argument("model_dir", help="local HF model directory")
    p.add_argument("--data", required=True, help=".txt (cut into prompts) or .jsonl (text/context field per line)")
    p.add_argument("--anchors", type=int, required=True, help="number of anchor layers, layer 0 included")
    p.add_argument("-o", "--output", required=True, help="plan JSON to write")
    p.add_argument("--length", type=int, default=4096, help="tokens per calibration prompt (default 4096)")
    p.add_argument("--num-prompts", type=int, default=8, help="at most this many prompts (default 8)")
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
    _add_runtime(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="time to first token and decode tokens/s, dense vs Kascade (CUDA graphs)")
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
    p.add_argument("--model", help="model directory (default: models/kascade-tiny, else a random tiny Llama)")
    p.add_argument("--plan", help="plan JSON (default: plans/kascade-tiny.json)")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default="auto")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
