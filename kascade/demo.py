"""`kascade demo`: one long prompt through dense and Kascade attention; agreement and time.

With the shipped model (models/kascade-tiny and plans/kascade-tiny.json) the prompt is a needle
question hidden in a long haystack and both answers are printed. Without it, a randomly
initialised Llama from kascade/configs/tiny-random-llama.json runs on random tokens with evenly
spaced anchors: that checks the plumbing only (random weights have no real attention).
"""

from __future__ import annotations

import time

import torch

import kascade
from kascade.models import TINY_MODEL_DIR, TINY_PLAN, load_model, random_model
from kascade.plan import Plan, uniform_anchors


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _needle_prompt(tokenizer, length: int, seed: int):
    """(input_ids [1, n], expected answer) from the evaluation templates, if they are available."""
    from kascade.eval.tasks import make_task

    sample = make_task("niah_single", length, tokenizer, seed=seed)
    return tokenizer(sample.prompt, return_tensors="pt").input_ids, sample.answers


def run_demo(model_dir=None, plan_path=None, length: int = 4096, new_tokens: int = 16, seed: int = 7,
             device: str | None = None, printer=print) -> dict:
    """Run the demo and return its measurements (also printed)."""
    model_dir = model_dir or (TINY_MODEL_DIR if (TINY_MODEL_DIR / "config.json").is_file() else None)
    answers = None
    if model_dir is not None:
        model, tok = load_model(model_dir, device=device)
        plan = Plan.load(plan_path or TINY_PLAN)
        label = f"{model_dir} (trained weights)"
        ids, answers = _needle_prompt(tok, length, seed)
    else:
        model, tok = random_model(), None
        L = model.config.num_hidden_layers
        plan = Plan.for_model(model.config, uniform_anchors(L, 3), rho=0.1, k_min=64)
        label = "tiny random Llama (RANDOM WEIGHTS: checks the plumbing, not accuracy)"
        length = min(length, 2048)
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=getattr(model.config, "eos_token_id", 0))
    printer(f"model: {label}")
    printer(f"plan: anchors {plan.anchors} of {model.config.num_hidden_layers} layers, rho {plan.rho}, "
            f"k_min {plan.k_min}, tile {plan.tile}")
    printer(f"prompt: {ids.shape[1]} tokens, device {dev}")
    with torch.no_grad():
        dense_logits, t_dense_fwd = _timed(lambda: model(ids).logits[0])
        dense_out, t_dense_gen = _timed(lambda: model.generate(ids, **gen)[0, ids.shape[1]:])
        with kascade.enable(model, plan):
            kas_logits, t_kas_fwd = _timed(lambda: model(ids).logits[0])
            kas_out, t_kas_gen = _timed(lambda: model.generate(ids, **gen)[0, ids.shape[1]:])
    top1 = float((dense_logits.argmax(-1) == kas_logits.argmax(-1)).float().mean())
    same = int((dense_out[: len(kas_out)] == kas_out[: len(dense_out)]).cumprod(0).sum())
    result = {"prompt_tokens": int(ids.shape[1]), "top1_agreement": top1, "generated_prefix_match": same,
              "new_tokens": int(len(dense_out)), "dense_forward_s": t_dense_fwd, "kascade_forward_s": t_kas_fwd,
              "dense_generate_s": t_dense_gen, "kascade_generate_s": t_kas_gen}
    printer(f"{'':24s}{'dense':>12s}{'kascade':>12s}")
    printer(f"{'prefill forward (s)':24s}{t_dense_fwd:12.2f}{t_kas_fwd:12.2f}")
    printer(f"{'generate (s)':24s}{t_dense_gen:12.2f}{t_kas_gen:12.2f}")
    printer(f"next-token (top-1) agreement over the prompt: {100 * top1:.1f}%")
    printer(f"greedy continuation: first {same} of {len(dense_out)} tokens identical")
    if tok is not None:
        dense_text = tok.decode(dense_out, skip_special_tokens=True)
        kas_text = tok.decode(kas_out, skip_special_tokens=True)
        result.update(dense_text=dense_text, kascade_text=kas_text)
        if answers:
            ok = {name: all(a in text for a in answers) for name, text in (("dense", dense_text), ("kascade", kas_text))}
            result.update(expected=answers, dense_correct=ok["dense"], kascade_correct=ok["kascade"])
            printer(f"expected:       {' / '.join(answers)}")
        printer(f"dense answer:   {dense_text!r}" + (f"  ({'correct' if ok['dense'] else 'wrong'})" if answers else ""))
        printer(f"kascade answer: {kas_text!r}" + (f"  ({'correct' if ok['kascade'] else 'wrong'})" if answers else ""))
    if dev.type == "cpu":
        printer("(CPU runs the pure-PyTorch reference: it shows agreement, not the GPU kernels' speed)")
    return result
