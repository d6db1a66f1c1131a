"""The calibration mixture: structured formats at exact lengths, format families, leave-one-family-out
splits, the worst-family objective and the candidate-limited search (mechanics on byte tokens and a tiny
random model; the numbers mean nothing)."""

import random
import re

import numpy as np
import pytest

from kascade.calibrate import output_aware as OA
from kascade.calibrate import structured
from kascade.calibrate.retrieval import FAMILY, LEAVE_OUT, MIXTURE, calibration_prompts, formats_without
from models import one_thread_fixture, tiny_model

_one_thread = one_thread_fixture()


class ByteChatTokenizer:
    """Bytes as tokens, with a chat template that frames every turn alike."""

    chat_template = "x"

    def __call__(self, text, add_special_tokens=True):
        class Enc:
            input_ids = list(text.encode("utf-8"))
        return Enc()

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        turns = "".join(f"<{m['role'][0]}>{m['content']}</{m['role'][0]}>" for m in messages)
        return "<s>" + turns + ("<a>" if add_generation_prompt else "")


TEXT = "".join(f"def helper_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(3000))


def _text(p) -> str:
    return bytes(p.ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("length", [600, 1500])
def test_every_format_has_the_exact_length_and_its_question(length):
    tok = ByteChatTokenizer()
    prompts = calibration_prompts(tok, TEXT, length, len(MIXTURE), MIXTURE)
    assert [p.kind for p in prompts] == list(MIXTURE)
    for p in prompts:
        assert len(p.ids) == length, p.kind
    text = {p.kind: _text(p) for p in prompts}
    seq = re.search(r"line with seq=(\d+)", text["telemetry"]).group(1)
    assert text["telemetry"].count(f"seq={seq}") == 2  # its line, and the question
    ref = re.search(r'ref "(MF-\d+)" is$', text["manifest"]).group(1)
    assert text["manifest"].count(f'"{ref}"') == 2
    crew = re.search(r"crew member (K-\d+) is$", text["roster"]).group(1)
    assert text["roster"].count(crew) == 2
    const = re.search(r"constant (\w+) is set to$", text["constants"]).group(1)
    assert text["constants"].count(f"{const} = ") == 1
    assert text["dossier"].count("In these notes") == 1
    chat = text["long_chat"]
    assert chat.startswith("<s><u>") and chat.count("<u>") == chat.count("</u>") and chat.count("<a>") == chat.count("</a>") + 1
    stated = next(s for s, _, _ in structured._CHAT_FACTS if s.split("{v}")[0] in chat)
    first_user_turns = chat.split("<u>")[1 : 1 + max(2, chat.count("<u>") // 4 + 1)]
    assert any(stated.split("{v}")[0] in t for t in first_user_turns)  # stated early
    assert chat.endswith(next(a for s, _, a in structured._CHAT_FACTS if s == stated))


def test_prompts_are_seeded_and_vary_with_the_seed():
    tok = ByteChatTokenizer()
    a = calibration_prompts(tok, TEXT, 900, 11, MIXTURE)
    b = calibration_prompts(tok, TEXT, 900, 11, MIXTURE)
    c = calibration_prompts(tok, TEXT, 900, 11, MIXTURE, first_seed=50)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert all(x.ids != y.ids for x, y in zip(a, c))


def test_structured_errors_name_the_argument():
    tok = ByteChatTokenizer()
    with pytest.raises(ValueError, match="length"):
        calibration_prompts(tok, TEXT, 80, 1, ("manifest",))
    with pytest.raises(ValueError, match="formats"):
        calibration_prompts(tok, TEXT, 900, 1, ("tweets",))


def test_a_tokenizer_without_chat_frames_drops_the_chat_formats():
    class Plain(ByteChatTokenizer):
        chat_template = None

    kinds = {p.kind for p in calibration_prompts(Plain(), TEXT, 700, 22, MIXTURE)}
    assert kinds == set(MIXTURE) - {"chat", "long_chat"}


def test_leave_one_family_out_never_sees_its_family():
    for family, gone in LEAVE_OUT.items():
        kept = formats_without(family)
        assert kept and not any(FAMILY[f] in gone for f in kept)
        assert set(MIXTURE) - set(kept) == {f for f in MIXTURE if FAMILY[f] in gone}
    assert "chat" not in formats_without("chat_history")  # a single-turn chat is a chat too
    with pytest.raises(ValueError, match="family"):
        formats_without("poetry")


def test_worst_family_objective_protects_the_worst_family():
    kinds = ["passkey", "door", "telemetry", "manifest"]
    values = np.array([0.1, 0.3, 0.9, 0.0])
    assert OA.family_divergences(values, kinds, [0, 1, 2, 3]) == pytest.approx(
        {"needle": 0.2, "records": 0.9, "json_records": 0.0})
    assert OA.objective_value(values, kinds, [0, 1, 2, 3], "worst-family") == pytest.approx(0.9)
    assert OA.objective_value(values, kinds, [0, 1, 2, 3], "mean") == pytest.approx(0.325)
    assert OA.objective_value(values, kinds, [0, 1, 3], "worst-family") == pytest.approx(0.2)
    with pytest.raises(ValueError, match="objective"):
        OA.objective_value(values, kinds, [0], "median")


def test_candidate_search_finds_the_full_search_plan_with_fewer_measurements():
    """On an additive harm (each unit's removal costs its own weight), the search that re-measures only
    the cheapest candidates removes the same units as the full search."""
    cfg = {"num_layers": 8, "num_kv_heads": 2}
    harm = {(layer, h): random.Random(layer * 2 + h).random() for layer in range(1, 8) for h in range(2)}
    everything = set(harm)
    calls = {"full": 0, "lazy": 0}

    def scorer(name):
        def score(selecting):
            calls[name] += 1
            return sum(harm[u] for u in everything - set(selecting))
        return score

    full, _ = OA.greedy_search(scorer("full"), cfg, target=4.0, shrink=5, progress=False)
    lazy, hist = OA.greedy_search(scorer("lazy"), cfg, target=4.0, shrink=5, progress=False, candidates=4)
    assert lazy == full and OA.units_cost(lazy, 2) == 4.0
    assert calls["lazy"] < calls["full"]
    with pytest.raises(ValueError, match="candidates"):
        OA.greedy_search(scorer("full"), cfg, target=4.0, candidates=0)


def test_folds_share_the_calibration_set_and_leave_their_family_out(tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    tok = ByteChatTokenizer()
    formats = ("passkey", "telemetry", "manifest", "long_chat")
    calib = OA.calibration_set(model, tok, TEXT, formats, length=600, num_prompts=4, answer_tokens=2,
                               batch_size=4, topk=16, tile=16, backend="reference", progress=False)
    kw = dict(num_anchors=2.0, k_min=16, tile=16, topk=16, backend="reference", progress=False, calib=calib)
    plan, report = OA.calibrate_output_aware(model, tok, TEXT, **kw)
    assert set(report["divergence_by_family"]) == {"needle", "records", "json_records", "chat_history"}
    measured = len(calib.memo)
    fold, fold_report = OA.calibrate_output_aware(model, tok, TEXT, leave_out="records", **kw)
    assert "records" not in fold_report["divergence_by_family"]
    assert "telemetry" not in fold.provenance["formats"] and fold.provenance["leave_out"] == "records"
    assert fold.provenance["plans_measured"] < measured  # the first step's plans were measured already
    state = calib.state()
    again = OA.CalibrationSet.from_state(model, state, backend="reference")
    assert again.kinds == calib.kinds and len(again.memo) == len(calib.memo)
    np.testing.assert_allclose(again.similarity(range(4)), calib.similarity(range(4)))
    path = tmp_path / "calib.pt"
    built, loaded = OA.CalibrationSet.cached(path, model, lambda: calib, backend="reference")
    assert built is calib and not loaded and path.is_file()
    resumed, loaded = OA.CalibrationSet.cached(path, model, lambda: pytest.fail("built again"), backend="reference")
    assert loaded and len(resumed.memo) == len(calib.memo) and resumed.kinds == calib.kinds


def test_sources_stay_inside_tensor_parallel_shards():
    """With tp_degree, every non-selecting unit reads a unit of its own shard, even where another shard's
    head would cover it better; the plan validates at that degree."""
    cfg = {"model_type": "llama", "num_layers": 3, "num_q_heads": 8, "num_kv_heads": 4, "head_dim": 16}
    sim = np.zeros((3, 3, 4, 4))
    sim[1, 2, 3, 0] = 0.9  # layer 2 head 0 is best served by layer 1 head 3, on the other shard at TP 2
    sim[0, 2, 1, 0] = 0.5
    free = OA.plan_of_units({(1, 3)}, sim, cfg)
    assert free.head_sources[2][0] == [1, 3]
    sharded = OA.plan_of_units({(1, 3)}, sim, cfg, tp_degree=2)
    assert sharded.head_sources[2][0] == [0, 1] and sharded.tp_degree == 2
    for layer, row in enumerate(sharded.head_sources):
        for h, src in enumerate(row or ()):
            assert src is None or src[1] // 2 == h // 2, (layer, h, src)


def test_calibration_formats_share_no_wording_with_the_evaluation_families():
    """Same kinds of data, never the evaluation's wording: no fixed string of the calibration formats equals
    a pool word of the evaluation families, and none contains one of their template pieces (of 12
    characters or more) or is contained in one."""
    families = pytest.importorskip("kascade.eval.families")
    theirs = families.family_wording()
    ours = structured.format_wording()
    words = {w.lower() for w in theirs}
    assert not [w for w in ours if w.lower() in words]
    pieces = [p.lower() for p in theirs if len(p) >= 12]
    clash = [(o, p) for o in ours for p in pieces if p in o.lower() or (len(o) >= 12 and o.lower() in p)]
    assert not clash, clash[:5]
