"""The CLI on a saved tiny random model: calibrate, then generate; demo; errors; `--version` and the
command list of `kascade` alone."""

import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import kascade
from kascade.cli import main
from kascade.plan import Plan
from models import tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs. " * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    model = tiny_model("llama", vocab_size=len(fast), bos_token_id=0, eos_token_id=1)
    model.save_pretrained(path)
    (path / "data.txt").write_text(TEXT * 4)
    return path


def test_calibrate_then_generate(model_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    rc = main(["calibrate", str(model_dir), "--data", str(model_dir / "data.txt"), "--recipe", "paper", "--anchors",
               "3", "-o", str(plan_path), "--length", "256", "--num-prompts", "2", "--topk", "16", "--k-min", "16",
               "--device", "cpu"])
    assert rc == 0
    plan = Plan.load(plan_path)
    assert len(plan.anchors) == 3 and plan.model["num_layers"] == 6
    assert json.loads(plan_path.read_text())["provenance"]["num_prompts"] == 2
    assert (tmp_path / "plan" / "anchor_score_vs_k.png").is_file()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT[:1500])
    rc = main(["generate", str(model_dir), "--plan", str(plan_path), "--prompt-file", str(prompt),
               "--max-new-tokens", "5", "--device", "cpu"])
    assert rc == 0
    assert "kascade:" in capsys.readouterr().err


def test_generate_with_full_budget_equals_dense(model_dir, tmp_path, capsys):
    from transformers import AutoConfig

    plan_path = tmp_path / "full.json"
    Plan.for_model(AutoConfig.from_pretrained(model_dir), [0, 3], rho=1.0, k_min=1).save(plan_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(TEXT[:1200])
    outs = []
    for extra in (["--plan", str(plan_path)], ["--dense"]):
        assert main(["generate", str(model_dir), "--prompt-file", str(prompt), "--max-new-tokens", "6",
                     "--device", "cpu", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_unknown_model_name_is_an_error_not_a_download(tmp_path, capsys):
    rc = main(["generate", "meta-llama/Llama-3.1-8B", "--plan", str(tmp_path / "p.json"),
               "--prompt-file", str(tmp_path / "x.txt")])
    assert rc == 2
    rc = main(["calibrate", "meta-llama/Llama-3.1-8B", "--data", "x.txt", "--recipe", "paper", "--anchors", "2",
               "-o", "p.json"])
    assert rc == 2
    assert "downloads nothing" in capsys.readouterr().err


def test_missing_plan_and_data_errors(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello")
    assert main(["generate", str(model_dir), "--prompt-file", str(prompt), "--device", "cpu"]) == 2
    assert main(["generate", str(model_dir), "--plan", str(tmp_path / "none.json"), "--prompt-file", str(prompt),
                 "--device", "cpu"]) == 2
    assert main(["calibrate", str(model_dir), "--data", str(tmp_path / "none.txt"), "--anchors", "2",
                 "-o", str(tmp_path / "p.json"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--plan is required" in err and "no file at" in err and "--data: no file" in err


def test_demo_runs(capsys):
    """The default model (SmolLM2 when converted, else kascade-tiny) answers with both attentions."""
    rc = main(["demo", "--length", "512", "--new-tokens", "4", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "agreement" in out and "kascade answer" in out


def test_demo_names_its_mode(capsys):
    """Decode-only by default (the prompt's agreement is not compared: it is dense's); --sparse-prefill yes
    compares it."""
    from kascade.models import TINY_MODEL_DIR

    if not (TINY_MODEL_DIR / "config.json").is_file():
        pytest.skip("models/kascade-tiny is not in this checkout")
    args = ["demo", "--model", str(TINY_MODEL_DIR), "--length", "300", "--new-tokens", "2", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mode: decode-only" in out and "not compared (decode-only mode" in out
    assert main(args + ["--sparse-prefill", "yes"]) == 0
    out = capsys.readouterr().out
    assert "mode: sparse prefill and decode" in out and "agreement over the prompt: " in out and "%" in out
    with pytest.raises(SystemExit):
        main(args + ["--sparse-prefill", "maybe"])
    assert "--sparse-prefill: invalid choice: 'maybe'" in capsys.readouterr().err


def test_demo_on_kascade_tiny_takes_its_plan(capsys):
    from kascade.models import TINY_MODEL_DIR

    if not (TINY_MODEL_DIR / "config.json").is_file():
        pytest.skip("models/kascade-tiny is not in this checkout")
    assert main(["demo", "--model", str(TINY_MODEL_DIR), "--length", "300", "--new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "task niah_single" in out and "of 12 layers" in out


def test_calibrate_refuses_a_search_step_below_two(model_dir, tmp_path, capsys):
    assert main(["calibrate", str(model_dir), "--data", str(model_dir / "data.txt"), "--recipe", "output-aware",
                 "--anchors", "2", "--search-step", "1", "-o", str(tmp_path / "p.json"), "--device", "cpu"]) == 2
    assert "--search-step: expected an integer >= 2" in capsys.readouterr().err


def test_calibrate_refuses_a_prefill_mode_without_the_output_aware_recipe(model_dir, tmp_path, capsys):
    assert main(["calibrate", str(model_dir), "--data", str(model_dir / "data.txt"), "--sparse-prefill", "no",
                 "--recipe", "paper", "--anchors", "2", "-o", str(tmp_path / "p.json"), "--device", "cpu"]) == 2
    assert "--sparse-prefill: needs --recipe output-aware" in capsys.readouterr().err


def test_calibrate_refuses_granularity_without_the_output_aware_recipe(model_dir, tmp_path, capsys):
    assert main(["calibrate", str(model_dir), "--data", str(model_dir / "data.txt"), "--granularity", "layer",
                 "--recipe", "paper", "--anchors", "2", "-o", str(tmp_path / "p.json"), "--device", "cpu"]) == 2
    assert "--granularity: needs --recipe output-aware" in capsys.readouterr().err


def test_demo_refuses_a_model_without_a_plan(model_dir, capsys):
    assert main(["demo", "--model", str(model_dir), "--device", "cpu"]) == 2
    assert "--plan: no shipped plan for the model at" in capsys.readouterr().err


def test_plan_round_trip_and_validation(tmp_path):
    model = tiny_model("llama")
    plan = Plan.for_model(model.config, [0, 2, 4], head_map=[[0, 1], [1, 1], [0, 1], [1, 0], [0, 1], [0, 0]],
                          rho=0.05, k_min=32, tile=16, provenance={"data": "x"})
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again == plan
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary left behind
    with pytest.raises(ValueError, match="unsorted|strictly increasing"):
        Plan(anchors=[0, 3, 2])
    with pytest.raises(ValueError, match="starting with layer 0"):
        Plan(anchors=[1, 3])
    with pytest.raises(ValueError, match="anchor layer 0 must map"):
        Plan(anchors=[0], head_map=[[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="head_map: layer 1 has values"):
        Plan(anchors=[0], head_map=[[0, 1], [0, 2]])
    with pytest.raises(ValueError, match="expected 6 rows"):
        Plan(anchors=[0], head_map=[[0, 1]] * 5).validate(model.config)
    with pytest.raises(ValueError, match="rho"):
        Plan(anchors=[0], rho=0)
    with pytest.raises(ValueError, match="k_min"):
        Plan(anchors=[0], k_min=0)
    with pytest.raises(ValueError, match="tile"):
        Plan(anchors=[0], tile=0)
    with pytest.raises(ValueError, match="unknown fields"):
        Plan.from_dict({"anchors": [0], "colour": "red"})
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        Plan.load(tmp_path / "bad.json")


COMMANDS = ("calibrate", "generate", "bench", "demo", "eval")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"kascade {kascade.__version__}\n"
    try:
        assert importlib.metadata.version("kascade") == kascade.__version__  # pyproject.toml and __init__ agree
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kascade is not installed (pip install -e .): no package metadata to compare with")


def test_no_arguments_lists_each_command_on_one_line(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kascade COMMAND")
    for name in COMMANDS:
        rows = [line for line in out.splitlines() if line.split()[:1] == [name]]
        assert len(rows) == 1, f"{name}: expected one line, got {rows}"
        assert len(rows[0].split()) > 1, f"{name}: no help text in {rows[0]!r}"


def test_no_arguments_from_the_shell():
    """The same through sys.argv (python -m kascade.cli, as the console script calls main())."""
    run = subprocess.run([sys.executable, "-m", "kascade.cli"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert all(f"  {name} " in run.stdout for name in COMMANDS)
    run = subprocess.run([sys.executable, "-m", "kascade.cli", "no-such-command"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "invalid choice" in run.stderr


def test_calibrate_defaults_to_the_output_aware_recipe_and_its_stopping_rule(model_dir, tmp_path, capsys):
    """No --recipe, --anchors or --tolerance: output-aware, two prompts per format, and a search that stops at a
    third of the layers (6 layers of 2 KV heads: 2.0 selecting-layer equivalents); it says what it chose."""
    from kascade.calibrate.output_aware import default_target

    plan_path = tmp_path / "plan.json"
    assert main(["calibrate", str(model_dir), "--data", str(model_dir / "data.txt"), "--formats", "passkey,door",
                 "--length", "300", "--answer-tokens", "2", "--topk", "16", "--k-min", "16", "--tile", "16",
                 "-o", str(plan_path), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "output-aware recipe on 4 prompts of 300 tokens" in captured.err
    assert "stops at 2.00 of 6 selecting-layer equivalents, a third of the layers" in captured.err
    plan = Plan.load(plan_path)
    assert plan.recipe == "output-aware" and plan.selecting_layers_equivalent <= default_target(6, 2) == 2.0
    settings = plan.provenance["settings"]
    assert (settings["recipe"], settings["anchors"], settings["default_target"]) == ("output-aware", 2.0, True)
    assert (settings["num_prompts"], settings["search_step"], settings["search_candidates"]) == (4, 5, 10)
    assert plan.provenance["formats"] == ["door", "passkey"]


def test_default_target_is_a_third_of_the_layers_in_whole_kv_heads():
    from kascade.calibrate.output_aware import default_target

    assert default_target(30, 3) == 10.0  # SmolLM2-135M
    assert default_target(12, 4) == 4.0  # kascade-tiny
    assert default_target(32, 8) == 10.625  # Llama-3.1-8B: 85 of 256 KV heads
    assert default_target(2, 1) == 1.0  # never below layer 0's
    with pytest.raises(ValueError, match="num_layers"):
        default_target(0, 8)


def test_calibrate_refuses_a_negative_candidate_count(model_dir, tmp_path, capsys):
    assert main(["calibrate", str(model_dir), "--data", str(model_dir / "data.txt"), "--search-candidates", "-1",
                 "-o", str(tmp_path / "p.json"), "--device", "cpu"]) == 2
    assert "--search-candidates: expected an integer >= 1, or 0 for every unit, got -1" in capsys.readouterr().err


def test_calibrate_warns_when_the_worst_family_diverges_past_the_validated_plans(capsys):
    from kascade.calibrate.output_aware import VALIDATED_WORST_FAMILY_KL
    from kascade.cli import _warn_if_unvalidated

    _warn_if_unvalidated({"divergence_by_family": {"records": VALIDATED_WORST_FAMILY_KL - 0.01, "prose": 0.01}})
    assert capsys.readouterr().err == ""
    _warn_if_unvalidated({"divergence_by_family": {"records": VALIDATED_WORST_FAMILY_KL + 0.05, "prose": 0.01}})
    err = capsys.readouterr().err
    assert "warning: the plan's worst format family (records) diverges by" in err and "kascade eval" in err
    _warn_if_unvalidated({})  # a search without families says nothing
    assert capsys.readouterr().err == ""
