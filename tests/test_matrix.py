"""Recipe matrices (train/matrix.py), the ablation recipes and their report (sample/ablations.py)."""

import json
from pathlib import Path

import pytest
import yaml

from sample.ablations import TABLES, Claim, aggregate, comparison, paired_loss, paired_runs, seed_variance, verdict, write_report
from sample.ablations import main as ablations_main
from store.config import ConfigError, load_config
from train.matrix import load_matrix, run_matrix

ABLATIONS = Path("configs/ablations")
LLMS = {"smollm2", "smollm2_plain", "smollm2_chat", "gemma3", "gemma3_plain"}


def test_every_ablation_recipe_is_in_the_matrix_and_sits_on_its_tables_baseline():
    matrix = load_matrix("configs/matrices/ablations.yaml")
    recipes = {run.recipe: load_config(run.config, run.overrides) for run in matrix.runs}
    assert set(recipes) == {p.stem for p in ABLATIONS.glob("*.yaml")} - {"base"}
    assert {r for t in TABLES for r, _ in t.rows} <= set(recipes)
    for name, config in recipes.items():
        used = set(config.model.encoders)
        assert not (used & LLMS and "minilm" in used), f"{name} mixes an LLM with the T5 role"
        assert len(used) == 1 or name.startswith("two-llm"), name
        assert config.cache_dir == "runs/ablations/cache" and config.train.max_minutes is None
    for name in ("llm-alone", "llm-refiner", "llm-causal-refiner", "llm-refiner-depth-1", "llm-refiner-depth-3",
                 "llm-refiner-no-gate"):  # Tables 2 (baseline), 3 and 5: one LLM without the instruction
        assert recipes[name].model.encoders == ["smollm2_plain"], name
    assert [recipes[n].model.refiner_depth for n in ("llm-alone", "llm-refiner-depth-1", "llm-refiner",
                                                      "llm-refiner-depth-3")] == [0, 1, 2, 3]
    assert recipes["llm-causal-refiner"].model.causal_refiner and not recipes["llm-refiner-no-gate"].model.gate
    for name in ("llm-instruction", "base-llm-alone", "base-llm-instruction", "t5-alone"):  # Table 4: no refiner
        assert recipes[name].model.refiner_depth == 0, name
    by_name = {e.name: e for e in recipes["llm-chat-refiner"].encoders}
    assert by_name["smollm2_chat"].template_suffix == "drop" and by_name["smollm2_chat"].system_prompt
    assert recipes["two-llm-concat"].model.fusion == "concat"
    # Gemma's features carry channels near 23,000 on every token: each recipe that reads them
    # normalises them, and Table 6 compares its rows with the same feature norm
    for name, config in recipes.items():
        if {"gemma3", "gemma3_plain"} & set(config.model.encoders):
            assert config.model.feature_norm == "rms", name
    table6 = next(t for t in TABLES if t.title.startswith("Table 6"))
    assert {recipes[r].model.feature_norm for r, _ in table6.rows} == {"rms"}
    assert recipes["two-llm-collaborative-mean"].model.collab_condition == "mean"


def test_a_broken_recipe_is_named(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"recipes": {"good": {}, "bad": {"model.depth": "deep"}}}))
    with pytest.raises(ConfigError, match="recipe 'bad'"):
        load_matrix(path)
    path.write_text(yaml.safe_dump({"recipes": {"a": {}}, "seed": 1}))
    with pytest.raises(ConfigError, match="unknown keys \\['seed'\\]"):
        load_matrix(path)


def test_a_recipe_can_have_its_own_seeds(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"seeds": [0], "recipes": {"baseline": {"seeds": [0, 1, 2]},
                                                             "lr": {"train.lr": 2.0e-3}}}, sort_keys=False))
    runs = [(r.recipe, r.seed) for r in load_matrix(path).runs]
    assert runs == [("baseline", 0), ("baseline", 1), ("baseline", 2), ("lr", 0)]
    assert [(r.recipe, r.seed) for r in load_matrix(path, seeds=[3]).runs] == [("baseline", 3), ("lr", 3)]
    assert not any("seeds" in o for r in load_matrix(path).runs for o in r.overrides)


def _record(recipe: str, accuracy: float, seed: int = 0, n: int = 500) -> dict:
    bins = [{"range": [0.0, 0.25], "mean": accuracy, "count": 10}]
    return {"recipe": recipe, "seed": seed, "overall": accuracy, "steps": 10, "images": 2 * n, "bias_bins": bins,
            "categories": {"single_object": accuracy, "colors": accuracy}, "counts": {"single_object": n, "colors": n}}


def test_interval_of_the_category_mean_and_claim_verdicts():
    stats = aggregate([_record("half", 0.5, n=100)])
    low, high = stats["half"]["interval"]  # two categories of 100 at 0.5: sd 0.5 / sqrt(208)
    assert low == pytest.approx(0.5 - 1.96 * 0.5 / 208**0.5, abs=1e-3) and high == pytest.approx(1 - low, abs=1e-6)
    assert aggregate([_record("zero", 0.0)])["zero"]["interval"][1] > 0  # no false certainty at 0
    two_seeds = aggregate([_record("a", 0.2, 0), _record("a", 0.4, 1)])["a"]
    assert two_seeds["mean"] == pytest.approx(0.3) and (two_seeds["min"], two_seeds["max"]) == (0.2, 0.4)
    stats = aggregate([_record(name, accuracy) for name, accuracy in
                       {"strong": 0.30, "weak": 0.10, "same": 0.302, "close": 0.12}.items()])
    assert verdict(Claim("", "strong", "weak", ">"), stats)[0] == "reproduced"
    assert verdict(Claim("", "weak", "strong", ">"), stats)[0] == "contradicted"
    assert verdict(Claim("", "close", "weak", ">"), stats)[0] == "cannot tell at this size"
    assert verdict(Claim("", "same", "strong", "="), stats)[0] == "consistent"
    assert verdict(Claim("", "strong", "weak", "="), stats)[0] == "contradicted"
    assert verdict(Claim("", "strong", "missing", ">"), stats)[0] == "not run"


def test_seed_noise_widens_the_interval_of_every_recipe():
    # 0.02 apart on 1000 prompts each: the prompts' noise alone calls it, but the seeds of one
    # recipe scatter by +-0.03, which the pooled seed variance carries over to every recipe
    one_seed = [_record("a", 0.30), _record("b", 0.28)]
    assert verdict(Claim("", "a", "b", ">"), aggregate(one_seed))[0] == "cannot tell at this size"
    precise = [_record("a", 0.30, n=20000), _record("b", 0.28, n=20000)]
    assert verdict(Claim("", "a", "b", ">"), aggregate(precise))[0] == "reproduced"
    noisy = precise + [_record("c", 0.27, 0, n=20000), _record("c", 0.33, 1, n=20000)]
    assert seed_variance(noisy) == pytest.approx(0.03**2 * 2)  # ((-0.03)^2 + 0.03^2) / (2 - 1)
    stats = aggregate(noisy)
    assert verdict(Claim("", "a", "b", ">"), stats)[0] == "cannot tell at this size"
    assert stats["a"]["interval"][1] - stats["a"]["interval"][0] > 2 * 1.96 * 0.04
    assert stats["c"]["machines"] == ["?"]  # records without a machine still aggregate


def test_claims_are_judged_on_the_held_out_loss_too():
    # equal scores, but A's held-out loss is lower by 10x its seed scatter: lower loss is better
    records = [{**_record(name, 0.2, seed), "heldout_loss": loss}
               for name, losses in {"a": (0.080, 0.082), "b": (0.100, 0.098)}.items()
               for seed, loss in enumerate(losses)]
    stats = aggregate(records)
    assert seed_variance(records, "heldout_loss") == pytest.approx(0.001**2 * 2)
    assert verdict(Claim("", "a", "b", ">"), stats)[0] == "cannot tell at this size"
    text, diff, (low, high) = verdict(Claim("", "a", "b", ">"), stats, "loss")
    assert (text, round(diff, 4)) == ("reproduced", -0.018) and low < diff < high < 0
    assert verdict(Claim("", "b", "a", ">"), stats, "loss")[0] == "contradicted"
    assert verdict(Claim("", "a", "b", "="), stats, "loss")[0] == "contradicted"
    unmeasured = aggregate([_record("a", 0.2), _record("b", 0.1)])
    assert verdict(Claim("", "a", "b", ">"), unmeasured, "loss")[0] == "not measured"


def test_the_table_of_every_recipe_shows_the_difference_only_against_a_baseline():
    records = [{**_record(name, accuracy, seed), "heldout_loss": 0.1}
               for name, accuracies in {"a": (0.30, 0.32), "b": (0.10, 0.12)}.items()
               for seed, accuracy in enumerate(accuracies)]
    stats = aggregate(records)
    plain, versus = comparison(stats).splitlines(), comparison(stats, "b").splitlines()
    assert plain[0].count("|") + 1 == versus[0].count("|") and "vs b" in versus[0] and "vs" not in plain[0]
    assert [row.split(" | ")[0] for row in plain[2:]] == ["| a", "| b"]
    assert versus[2].split(" | ")[5].startswith("+0.200 (") and versus[3].split(" | ")[5] == "-"
    with pytest.raises(KeyError, match="'c'"):
        comparison(stats, "c")


def test_paired_loss_compares_each_run_with_the_baseline_of_its_own_seed(tmp_path):
    def run(name: str, losses: dict[int, float]) -> None:
        (tmp_path / name / "logs").mkdir(parents=True)
        rows = "".join(f"0,{step},{loss},0.001\n" for step, loss in losses.items())
        (tmp_path / name / "logs" / "metrics.csv").write_text("epoch,step,train/loss,train/lr\n" + rows)

    run("baseline-s0", {49: 0.9, 99: 0.5, 149: 0.4, 199: 0.3})
    run("baseline-s1", {49: 0.8, 99: 0.6, 149: 0.5, 199: 0.4})
    run("fast-s0", {49: 0.8, 99: 0.45, 149: 0.35, 199: 0.25})  # 0.05 below its seed's baseline from step 99
    run("fast-s1", {49: 0.7, 99: 0.7, 149: 0.6})  # cut off before step 199: 0.1 above
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in
            paired_loss(tmp_path, "baseline", 99, 199).splitlines()[2:]}
    assert set(rows) == {"fast-s0", "fast-s1"}
    assert rows["fast-s0"][1] == "3 (99-199)" and rows["fast-s0"][3] == "-0.0500" and rows["fast-s0"][4] == "0.0000"
    assert rows["fast-s1"][1] == "2 (99-149)" and rows["fast-s1"][3] == "+0.1000"
    assert ablations_main(["--results", str(tmp_path / "results.json"), "--paired-loss", "fast"]) == 0
    assert ablations_main(["--results", str(tmp_path / "results.json"), "--paired-loss", "slow"]) == 2  # no such runs
    run("lone-s2", {149: 0.1})  # no baseline of seed 2: named under the table, not dropped silently
    assert paired_loss(tmp_path, "baseline", 99, 199).splitlines()[-1].endswith(": lone-s2")
    # run folders named directly: the same rows as the matrix's for the same pair
    direct = paired_runs(tmp_path / "baseline-s0", [tmp_path / "fast-s0", tmp_path / "lone-s2"], 99, 199).splitlines()
    assert direct[2].split(" | ")[1:] == rows["fast-s0"][1:]
    assert direct[3].startswith("| lone-s2 | fewer than 2 common steps")  # one logged step only
    assert ablations_main(["--paired-runs", str(tmp_path / "baseline-s0"), str(tmp_path / "fast-s0")]) == 0
    assert ablations_main(["--paired-runs", str(tmp_path / "baseline-s0"), str(tmp_path / "missing")]) == 2


def _matrix(tmp_path: Path, tiny_cache: dict) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**tiny_cache, "cache_dir": f"{tiny_cache['run_dir']}/cache"}))
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "base": str(base), "out": str(tmp_path / "out"), "seeds": [0], "jobs": 2, "eval_rows": 4,
        "set": {"train.steps": 3}, "recipes": {"llm-alone": {"model.encoders": ["llm"], "model.refiner_depth": 0},
                                              # a curriculum: its first stage in a process of its own
                                              "both": {"train.stages": [{"name": "a", "steps": 2}, {"name": "b", "steps": 3}]}}},
                             sort_keys=False))  # the file's recipe order
    return path


def test_matrix_trains_scores_resumes_and_reports(tiny_cache, tmp_path, capsys):
    path = _matrix(tmp_path, tiny_cache)
    matrix = load_matrix(path)
    records = run_matrix(matrix, str(path))
    assert [(r["recipe"], r["seed"], r["steps"], r["images"]) for r in records] == [("llm-alone", 0, 3, 4),
                                                                                   ("both", 0, 3, 4)]
    for record in records:
        assert set(record["categories"]) and len(record["bias_bins"]) == 4 and record["ceiling"] == 1.0
        assert 0 < record["heldout_loss"] < 10
    assert [(r["stage"], r["samples"]) for r in records[1]["earlier_stages"]] == [("a", 2 * tiny_cache["train"]["batch_size"])]
    assert (tmp_path / "out" / "both-s0" / "stages" / "1-a" / "checkpoints" / "model.json").is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == records
    first = (tmp_path / "out" / "both-s0" / "result.json").stat().st_mtime
    assert run_matrix(load_matrix(path), str(path)) == records  # finished runs are skipped
    assert "2 already finished, 0 to go" in capsys.readouterr().out
    assert (tmp_path / "out" / "both-s0" / "result.json").stat().st_mtime == first

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ABLATIONS.md").write_text("old\n<!-- notes -->\nkept by hand\n")
    records = [{**r, "recipe": "llm-alone" if r["recipe"] == "llm-alone" else "t5-alone"} for r in records]
    write_report(records, docs)
    text = (docs / "ABLATIONS.md").read_text()
    assert "| t5-alone | T5 role (MiniLM), no refiner | 1 | 3 |" in text and text.endswith("kept by hand\n")
    assert (docs / "figures" / "ablations_positional_bias.png").stat().st_size > 1000
    assert aggregate(records)["llm-alone"]["images"] == 4 and set(records[0]["counts"]) == set(records[0]["categories"])
