"""kascade.enable on whole tiny models: equivalences with dense, oracle top-k, padding, generate."""

import pytest
import torch

import kascade
from kascade import reference as R
from kascade.integrations.transformers import attention_modules
from kascade.plan import Plan
from kascade.strategy import Strategy
from models import left_padded, tiny_model

ARCHS = ["llama", "qwen3", "mistral"]


def _ids(seed, batch, length, vocab=256):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_full_budget_equals_dense_whole_model(arch):
    model = tiny_model(arch)
    ids = _ids(1, 2, 200)
    with torch.no_grad():
        dense = model(ids).logits
        plan = Plan.for_model(model.config, [0, 2, 4], rho=1.0, k_min=1, tile=32)
        with kascade.enable(model, plan, sparse_prefill=True):
            sparse = model(ids).logits
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # restored on exit


class RecordingOracle(Strategy):
    """Every layer: its own pooled top-k (the oracle), computed by the reference directly."""

    def __init__(self, rho, k_min, tile):
        super().__init__("reference")
        self.rho, self.k_min, self.tile = rho, k_min, tile

    def attend(self, layer, q, k, v, kv_start, scale):
        if layer == 0:
            return R.dense_attention(q, k, v, kv_start=kv_start, scale=scale)
        sel = R.select(q, k, self.rho, self.k_min, self.tile, kv_start=kv_start, scale=scale)
        return R.sparse_attention(q, k, v, sel, kv_start=kv_start, scale=scale)


def test_every_layer_anchor_equals_per_layer_topk():
    model = tiny_model("llama")
    ids = _ids(2, 1, 300)
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        with kascade.enable(model, strategy=RecordingOracle(0.1, 8, 32)):
            oracle = model(ids).logits
        every_layer = Plan.for_model(model.config, list(range(layers)), rho=0.1, k_min=8, tile=32)
        with kascade.enable(model, every_layer, sparse_prefill=True):
            allanchors = model(ids).logits
        dense = model(ids).logits
    torch.testing.assert_close(allanchors, oracle, atol=1e-5, rtol=1e-5)
    assert (allanchors - dense).abs().max() > 1e-3  # the budget really is sparse here


def test_reuse_uses_mapped_anchor_heads():
    """Swapping the head map changes the output (the map is honoured), identity differs from swapped."""
    model = tiny_model("llama")
    ids = _ids(3, 1, 300)
    L, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    ident = [list(range(hkv))] * L
    swapped = [list(range(hkv)) if l in (0, 3) else [1, 0] for l in range(L)]
    with torch.no_grad():
        outs = []
        for hm in (ident, swapped):
            plan = Plan.for_model(model.config, [0, 3], head_map=hm, rho=0.1, k_min=8)
            with kascade.enable(model, plan, sparse_prefill=True):
                outs.append(model(ids).logits)
    assert (outs[0] - outs[1]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_batched_left_padded_generate_matches_one_by_one(arch):
    model = tiny_model(arch, seed=1)
    plan = Plan.for_model(model.config, [0, 2, 4], rho=0.1, k_min=16, tile=32)
    prompts = [_ids(10, 1, 260)[0], _ids(11, 1, 190)[0], _ids(12, 1, 233)[0]]
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad(), kascade.enable(model, plan, sparse_prefill=True):
        batched = model.generate(ids, attention_mask=mask, **gen)[:, width:]
        single = [model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **gen)[0, len(p):]
                  for p in prompts]
    for i in range(len(prompts)):
        assert batched[i].tolist() == single[i].tolist()


def test_kascade_decode_differs_from_dense_but_runs():
    """At a small budget, generation through DynamicCache runs and the decode steps use selection."""
    model = tiny_model("mistral", seed=2)
    ids = _ids(4, 1, 400)
    plan = Plan.for_model(model.config, [0, 3], rho=0.05, k_min=4)
    with torch.no_grad(), kascade.enable(model, plan, sparse_prefill=True) as handle:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert set(handle.strategy.state) == {0, 3}  # anchors selected during the last decode step
        assert handle.strategy.state[3].decode
    assert out.shape == (1, 404)


def test_state_does_not_leak_between_forwards():
    model = tiny_model("llama")
    plan = Plan.for_model(model.config, [0, 2], rho=0.1, k_min=8)
    a, b = _ids(5, 1, 300), _ids(6, 1, 300)
    with torch.no_grad(), kascade.enable(model, plan, sparse_prefill=True):
        first = model(a).logits
        model(b)
        again = model(a).logits
    torch.testing.assert_close(first, again)


def test_enable_errors_and_disable():
    model = tiny_model("llama")
    other = Plan(anchors=[0, 2], model={"num_layers": 32, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128})
    with pytest.raises(ValueError, match="made for another model"):
        kascade.enable(model, other)
    with pytest.raises(ValueError, match="anchors"):
        kascade.enable(model, Plan(anchors=[0, 9]))
    with pytest.raises(ValueError, match="exactly one"):
        kascade.enable(model)
    with pytest.raises(ValueError, match="backend"):
        kascade.enable(model, Plan(anchors=[0]), backend="cuda-magic")
    handle = kascade.enable(model, Plan.for_model(model.config, [0, 3]))
    assert all(hasattr(m, "kascade_strategy") for m in attention_modules(model))
    handle.disable()
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "kascade_strategy") for m in attention_modules(model))
    kascade.disable(model)  # a second disable is a no-op


def test_sliding_window_models_are_refused():
    model = tiny_model("mistral")
    model.config.sliding_window = 64
    with pytest.raises(ValueError, match="sliding-window"):
        kascade.enable(model, Plan.for_model(model.config, [0, 3]))


def test_right_padding_is_refused():
    model = tiny_model("llama")
    ids = _ids(7, 2, 200)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with torch.no_grad(), kascade.enable(model, Plan.for_model(model.config, [0, 3], k_min=8), sparse_prefill=True):
        with pytest.raises(ValueError, match="left padding only"):
            model(ids, attention_mask=mask)
