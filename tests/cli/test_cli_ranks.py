"""The `recommend` and `memory` commands: parse, call, print or write."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from spectra.cli import app
from spectra.ranks import load_plan
from tests.memory.test_memory import LLAMA2_7B
from tests.ranks.rows import PLANTED, analysis, make_row

runner = CliRunner()


def _analysis_dir(tmp_path, with_config=True):
    base = tmp_path / "base"
    base.mkdir()
    if with_config:
        cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}
        (base / "config.json").write_text(json.dumps(cfg))
    data = analysis(make_row("model.layers.0.self_attn.q_proj", PLANTED, layer=0),
                    make_row("model.layers.1.self_attn.v_proj", [4.0, 0.1, 0.1], shape=(16, 32), role="v", layer=1))
    data["base"] = {"path": str(base), "fingerprint": "abc"}
    run = tmp_path / "run"
    run.mkdir()
    (run / "analysis.json").write_text(json.dumps(data))
    return run


def test_recommend_prints_table_memory_and_writes_plan(tmp_path):
    run = _analysis_dir(tmp_path)
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["recommend", str(run), "--energy", "0.9", "--rslora", "-o", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "training total" in result.output
    # names after their common prefix, which heads the column
    assert "┃ model.layers.… " in result.output and "│ 0.self_attn.q_proj" in result.output
    plan = load_plan(out)
    assert [m.rank for m in plan.modules] == [3, 1] and plan.policy.rslora
    assert json.loads(out.read_text())["peft_config"]["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 3}



def test_recommend_json_and_plan_file_hold_the_same_document(tmp_path):
    # --json printed the plan and the memory estimate but not the peft_config the file holds; the file had the
    # peft_config but not the memory estimate the table and --json show
    run = _analysis_dir(tmp_path)
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["recommend", str(run), "--energy", "0.9", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed, written = json.loads(result.output), json.loads(out.read_text())
    assert printed == written
    assert printed["peft_config"]["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 3}
    assert printed["peft_config"]["r"] == 1 and printed["peft_config"]["target_modules"]
    assert printed["memory"]["method"] == "lora" and printed["memory"]["training_total"] > 0
    assert [m.rank for m in load_plan(out).modules] == [3, 1]  # the added keys are not read back
    alone = runner.invoke(app, ["recommend", str(run), "--energy", "0.9", "--json"])  # without -o: the same
    assert json.loads(alone.output) == printed

def test_recommend_budget_json_and_without_config(tmp_path):
    run = _analysis_dir(tmp_path, with_config=False)
    result = runner.invoke(app, ["recommend", str(run / "analysis.json"), "--budget", "200", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["totals"]["params"] <= 200 and data["memory"] is None
    assert data["policy"]["energy"] is None and data["policy"]["budget_params"] == 200


def test_recommend_writes_its_plan_when_the_memory_model_lacks_the_architecture(tmp_path):
    # GPT-NeoX analyses and plans, but spectra's memory model does not describe it: the optional
    # estimate used to abort the command (exit 2, no plan written)
    run = _analysis_dir(tmp_path)
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 32}))
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["recommend", str(run), "--energy", "0.9", "-o", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "memory: no estimate" in result.output and "gpt_neox" in result.output
    assert [m.rank for m in load_plan(out).modules] == [3, 1]
    result = runner.invoke(app, ["recommend", str(run), "--energy", "0.9", "--json"])
    data = json.loads(result.output)
    assert data["memory"] is None and "gpt_neox" in data["memory_skipped"]


def test_recommend_finds_the_config_beside_a_single_weights_file(tmp_path):
    # an analysis whose base was given as a .safetensors file (or an index .json): the config.json beside it
    # gives the memory estimate (it said "pass --config")
    run = _analysis_dir(tmp_path)
    data = json.loads((run / "analysis.json").read_text())
    data["base"]["path"] = str(tmp_path / "base" / "model.safetensors")
    (tmp_path / "base" / "model.safetensors").write_bytes(b"")  # stands for the weights file analysed
    (run / "analysis.json").write_text(json.dumps(data))
    result = runner.invoke(app, ["recommend", str(run), "--energy", "0.9"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "training total" in result.output


def test_recommend_refuses_a_bad_method_or_role_and_memory_a_weights_file(tmp_path):
    run = _analysis_dir(tmp_path)
    result = runner.invoke(app, ["recommend", str(run), "--method", "qlroa"])
    assert result.exit_code != 0 and "--method 'qlroa'" in str(result.exception)  # was: plan written, no estimate
    result = runner.invoke(app, ["recommend", str(run), "--roles", "q,V"])
    assert result.exit_code != 0 and "unknown role(s) V" in str(result.exception)  # was: V dropped silently
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x89binary\xff" * 10)
    result = runner.invoke(app, ["memory", str(weights)])
    assert result.exit_code != 0 and "is a weights file" in str(result.exception)  # was: UnicodeDecodeError, then
    assert "pass its config.json or its folder" in str(result.exception)  # "not valid JSON ('utf-8' codec …)"
    (tmp_path / "list.json").write_text("[1]")
    result = runner.invoke(app, ["memory", str(tmp_path / "list.json")])
    assert result.exit_code != 0 and "must be a JSON object" in str(result.exception)


def test_recommend_errors_are_one_paragraph(tmp_path):
    run = _analysis_dir(tmp_path)
    result = runner.invoke(app, ["recommend", str(run), "--budget", "10"])
    assert result.exit_code != 0 and "below the cheapest plan" in str(result.exception)


def test_memory_table_and_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    result = runner.invoke(app, ["memory", str(tmp_path), "--method", "qlora", "--rank", "16"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "quant constants" in result.output and "103,013,248" in result.output
    result = runner.invoke(app, ["memory", str(tmp_path / "config.json"), "--method", "full", "--precision", "mixed",
                                 "--json"])
    data = json.loads(result.output)
    assert data["optimizer_states"] == 12 * data["params"] and data["adapter"] == 0


def test_recommend_writes_the_models_names_and_prints_what_they_approximate(tmp_path):
    """transformers-5 Mixtral: plan.json's peft_config targets the fused expert parameters, and says where it rounds."""
    from spectra.analysis import analyze
    from tests.models import planted_mixtral_pair

    _, b, t = planted_mixtral_pair(tmp_path)
    (tmp_path / "run").mkdir()
    analyze(b, t, cache_dir=False, progress=False).save(tmp_path / "run" / "analysis.json")
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["recommend", str(tmp_path / "run"), "--energy", "0.99", "-o", str(out)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "peft_config: model.layers.1.mlp.experts.gate_up_proj:" in result.output
    cfg = json.loads(out.read_text())["peft_config"]
    assert "model.layers.1.mlp.experts.gate_up_proj" in cfg["target_parameters"]
    assert not any("block_sparse_moe" in n for n in cfg["target_modules"])


def test_recommend_refuses_options_it_would_ignore(tmp_path):
    """--alpha under the default scale rule, --scale under the constant one and --rank with --energy had no effect."""
    run = _analysis_dir(tmp_path)
    for args, message in ((["--alpha", "4"], "--alpha has no effect under --alpha-rule scale"),
                          (["--alpha-rule", "constant", "--scale", "3"], "--scale has no effect under --alpha-rule constant"),
                          (["--rank", "4", "--energy", "0.5"], "--energy would be ignored"),
                          (["--rank", "4", "--knee"], "--knee would be ignored")):
        result = runner.invoke(app, ["recommend", str(run), *args])
        assert result.exit_code != 0 and message in str(result.exception), args
    result = runner.invoke(app, ["recommend", str(run), "--alpha-rule", "constant", "--alpha", "4", "--json"])
    assert result.exit_code == 0, result.output  # the working forms
    assert {m["alpha"] for m in json.loads(result.output)["modules"]} == {4.0}
    result = runner.invoke(app, ["recommend", str(run), "--rank", "2", "--json"])
    assert result.exit_code == 0 and {m["rank"] for m in json.loads(result.output)["modules"]} == {2}


def test_memory_of_full_fine_tuning_defaults_to_mixed_precision(tmp_path):
    """`spectra memory --method full` gave pure-bf16 AdamW (51 GiB for Llama-2-7B) while the README's table and
    its 16 B/parameter rule are mixed precision (~100 GiB); adapters keep the bf16 base."""
    from spectra.memory import estimate_memory

    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    result = runner.invoke(app, ["memory", str(tmp_path), "--method", "full", "--json"])
    assert result.exit_code == 0, result.output
    est = json.loads(result.output)
    mixed = estimate_memory(LLAMA2_7B, method="full", precision="mixed")
    assert est["precision"] == "mixed" and est["training_total"] == mixed.training_total
    assert est["training_total"] > 1.9 * estimate_memory(LLAMA2_7B, method="full", precision="bf16").training_total
    assert estimate_memory(LLAMA2_7B, method="lora").precision == "bf16"


def test_memory_cli_passes_layers_cache_and_input_grads_to_the_model(tmp_path):
    from spectra.memory import estimate_memory

    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    for args, kwargs in ((["--layers", "20-31"], {"layers_to_transform": tuple(range(20, 32))}),
                         (["--layers", "20-31", "--input-require-grads"],
                          {"layers_to_transform": tuple(range(20, 32)), "input_require_grads": True}),
                         (["--no-gradient-checkpointing", "--no-use-cache"],
                          {"gradient_checkpointing": False, "use_cache": False})):
        result = runner.invoke(app, ["memory", str(tmp_path), *args, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["training_total"] == estimate_memory(LLAMA2_7B, **kwargs).training_total
        inputs = json.loads(result.output)["inputs"]  # the JSON says what it was asked
        assert inputs["rank"] == 16 and inputs["layers"] == (args[1] if args[0] == "--layers" else None)
    later = estimate_memory(LLAMA2_7B, layers_to_transform=tuple(range(20, 32))).training_total
    assert later < estimate_memory(LLAMA2_7B).training_total  # the early blocks keep nothing


def test_memory_layers_it_would_ignore_or_cannot_read_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    for args, message in ((["--method", "full", "--layers", "0-0"], "--method full trains every weight, so --layers"),
                          (["--method", "full", "--rank", "64"], "so --rank would be ignored"),
                          (["--method", "full", "--plan", "p.json"], "so --plan would be ignored"),
                          (["--layers", "1-0"], "0 ≤ FIRST ≤ LAST"),
                          (["--layers", "30-40"], "must name layers of this 32-layer model")):
        result = runner.invoke(app, ["memory", str(tmp_path), *args])
        assert result.exit_code != 0 and message in str(result.exception), (args, result.exception)


def test_memory_with_a_plan_refuses_rank_and_roles(tmp_path):
    """`memory --plan P --rank 4 --roles q` gave the plan's estimate, ignoring both options in silence."""
    run = _analysis_dir(tmp_path)
    plan = tmp_path / "plan.json"
    assert runner.invoke(app, ["recommend", str(run), "-o", str(plan)]).exit_code == 0
    result = runner.invoke(app, ["memory", str(tmp_path / "base"), "--plan", str(plan), "--rank", "4", "--roles", "q"])
    message = "--plan sets the modules, ranks and layers, so --rank, --roles would be ignored"
    assert result.exit_code != 0 and message in str(result.exception)
    assert runner.invoke(app, ["memory", str(tmp_path / "base"), "--plan", str(plan), "--json"]).exit_code == 0


def test_recommend_refuses_a_batch_or_length_below_one(tmp_path):
    """`recommend --batch 0` planned and printed "memory: no estimate (batch must be …)", exit 0: the user's own
    option read as a model the memory model lacks."""
    run = _analysis_dir(tmp_path)
    for option in ("--batch", "--seq-len"):
        result = runner.invoke(app, ["recommend", str(run), option, "0"], env={"COLUMNS": "200"})
        said = f"{option} must be ≥ 1, got 0."  # as spectra refuses (`spectra` prints it as "error: …", exit 2)
        assert result.exit_code != 0 and said == str(result.exception), (result.exception, result.output)
        assert "LoRA plan" not in result.output
    result = runner.invoke(app, ["recommend", str(run), "--batch", "2"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "batch 2 ×" in result.output, result.output  # negative control


def test_a_dora_plan_is_estimated_as_dora_and_recommend_refuses_a_method_dora_overrides(tmp_path):
    """`memory --plan` of a `recommend --dora` plan estimated plain LoRA (no magnitudes, ~40 % less) without a word,
    and `recommend --dora --method qlora` printed a DoRA estimate, dropping the typed method."""
    run = _analysis_dir(tmp_path)
    plan = tmp_path / "dora.json"
    assert runner.invoke(app, ["recommend", str(run), "--dora", "-o", str(plan)]).exit_code == 0

    def estimate(*extra):
        result = runner.invoke(app, ["memory", str(tmp_path / "base"), "--plan", str(plan), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    default, dora, lora = estimate(), estimate("--method", "dora"), estimate("--method", "lora")
    assert default["method"] == "dora" and default["inputs"]["method"] == "dora"
    assert default["training_total"] == dora["training_total"] > lora["training_total"]  # the typed method still wins
    assert default["dora_magnitude"] > 0 == lora["dora_magnitude"]
    for method in ("qlora", "lora"):
        result = runner.invoke(app, ["recommend", str(run), "--dora", "--method", method])
        assert result.exit_code != 0 and f"--method {method} would be ignored" in str(result.exception)
    assert runner.invoke(app, ["recommend", str(run), "--dora", "--method", "dora"]).exit_code == 0


def test_recommend_refuses_options_it_would_ignore_or_override(tmp_path):
    """--uniform-share without --uniform was ignored, and --rank 4 --max-rank 2 planned rank 2 everywhere, silently."""
    run = _analysis_dir(tmp_path)
    result = runner.invoke(app, ["recommend", str(run), "--uniform-share", "0.5"])
    assert result.exit_code != 0 and "without --uniform it would be ignored" in str(result.exception)
    result = runner.invoke(app, ["recommend", str(run), "--rank", "4", "--max-rank", "2"])
    assert result.exit_code != 0 and "--rank 4 is above --max-rank 2" in str(result.exception)
    result = runner.invoke(app, ["recommend", str(run), "--uniform", "--uniform-share", "0.5", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["policy"]["uniform_share"] == 0.5  # with --uniform
    result = runner.invoke(app, ["recommend", str(run), "--uniform", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["policy"]["uniform_share"] == 0.9  # the default
    assert runner.invoke(app, ["recommend", str(run), "--rank", "2", "--max-rank", "2"]).exit_code == 0
    # --rank 2 --min-rank 4 planned rank 4 everywhere, silently
    result = runner.invoke(app, ["recommend", str(run), "--rank", "2", "--min-rank", "4"])
    assert result.exit_code != 0 and "--rank 2 is below --min-rank 4" in str(result.exception)
    assert runner.invoke(app, ["recommend", str(run), "--rank", "4", "--min-rank", "4"]).exit_code == 0
