"""The shipped kascade-tiny model: loads, generates, fits the size limits."""

import json

import pytest
import torch

from kascade.tiny import MODEL_DIR

MiB = 2 ** 20


@pytest.fixture(scope="module")
def model_and_tok():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    model.eval()
    return model, tok


def test_files_and_sizes():
    shards = sorted(MODEL_DIR.glob("*.safetensors"))
    assert shards
    assert all(p.stat().st_size <= 16 * MiB for p in shards)
    assert sum(p.stat().st_size for p in shards) <= 24 * MiB
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "README.md"):
        assert (MODEL_DIR / name).exists(), name


def test_config():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 12 and cfg["hidden_size"] == 256
    assert cfg["num_attention_heads"] == 8 and cfg["num_key_value_heads"] == 4 and cfg["head_dim"] == 64
    assert cfg["max_position_embeddings"] == 8192 and cfg["tie_word_embeddings"]
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
    assert theta == 500000.0


def test_parameter_count(model_and_tok):
    model, _ = model_and_tok
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert n <= 12_000_000


def test_greedy_generate(model_and_tok):
    model, tok = model_and_tok
    enc = tok("def add(a, b):\n    return", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)


def test_short_needle_is_retrieved(model_and_tok):
    from kascade.tiny.evaluate import build_eval_sample, greedy, score

    model, tok = model_and_tok
    sample, _ = build_eval_sample("niah_single", 999_001, 768, tok, None, "filler", depths=[0.3])
    ids = tok(sample.prompt)["input_ids"]
    gen = greedy(model, ids, 10, "cpu", None, {tok.eos_token_id})
    ok, _ = score("niah_single", sample, tok.decode(gen, skip_special_tokens=True))
    assert ok == 1.0
