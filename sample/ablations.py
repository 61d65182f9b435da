"""`python -m sample.ablations`: docs/ABLATIONS.md and docs/ablations.json from the ablation matrix.

Reads the records `python -m train.matrix configs/matrices/ablations.yaml` wrote (one per
recipe and seed) and lays them out as the paper's tables: per recipe the mean ShapeEval
score over seeds, its spread (min-max over seeds) and a 95% interval from two noises: the
binomial noise of the held-out prompts (`overall_variance`: the overall score is a mean of
category accuracies), and the seed-to-seed noise of training, pooled over every recipe run
with two seeds or more (`seed_variance`; with 2 seeds a recipe's own spread is too rough an
estimate). Each of the paper's claims (PAPER.md, "Evaluation in the paper") is judged from
the difference of two recipes' mean scores and that difference's 95% interval:

- a claim that A beats B: "reproduced" if the interval lies above 0, "contradicted" if
  below, else "cannot tell at this size";
- a claim that A changes nothing against B: "consistent" if the interval contains 0 and
  lies within +-0.05, "contradicted" if it excludes 0, else "cannot tell at this size".

Each claim is judged a second time on the held-out loss (train/matrix.py: `heldout_loss`, the
EMA model's flow loss on the same held-out rows, times and noise for every run; lower is
better), whose 95% interval comes from its own pooled seed-to-seed variance, and whose
"changes nothing" margin is 0.005. It is the lower-variance measure while the scores sit near
the floor, but it measures how well the model denoises given the text, not whether its
samples follow the prompt: the report shows both, side by side.

Also draws the positional-bias curves of the LLM alone, the LLM with the refiner and the
T5-role encoder (docs/figures/ablations_positional_bias.png). Text below the line
`<!-- notes -->` in an existing ABLATIONS.md is kept.

`--compare RECIPE --results runs/matrices/recipe/results.json` prints instead a table of
every recipe of any matrix against one of them (docs/RESULTS.md's recipe study).

`--paired-loss RECIPE --steps FROM TO --results runs/matrices/<name>/results.json` reads the
training loss each run logged (`<run>/logs/metrics.csv`, no results.json needed: runs cut off
before scoring count too) and compares it, step by logged step, with the run of RECIPE that has
the same seed. Runs of one seed draw the same batches, times and noise at every step
(train/module.py), so the paired difference cancels most of the noise of single-step losses;
it says which change trains faster at equal steps, not which samples better.
`--paired-runs BASELINE RUN... --steps FROM TO` does the same for run folders trained outside
a matrix (`runs/<name>`) with one seed, each RUN against BASELINE.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from sample.eval import plot_bias
from sample.shapeeval import CATEGORIES

NOTES_MARKER = "<!-- notes -->"
MARGIN = 0.05  # "changes nothing": the difference's interval within +-MARGIN
LOSS_MARGIN = 0.005  # the same on the held-out loss (about 5% of it at the default's length)
Z95 = 1.959964


@dataclass
class Claim:
    text: str
    a: str  # recipe
    b: str  # recipe
    relation: str  # ">" (a beats b) or "=" (a changes nothing against b)


@dataclass
class Table:
    title: str
    baseline: str
    rows: list[tuple[str, str]]  # (recipe, what it is)
    claims: list[Claim]


TABLES = [
    Table("The premise (Table 3's rows; the positional-bias figure)", "each encoder alone, no instruction",
          [("t5-alone", "T5 role (MiniLM), no refiner"), ("t5-refiner", "T5 role + refiner"),
           ("llm-alone", "causal LLM (SmolLM2), no refiner"), ("llm-refiner", "causal LLM + refiner")],
          [Claim("an LLM alone follows prompts worse than T5", "t5-alone", "llm-alone", ">"),
           Claim("the refiner does nothing for T5", "t5-refiner", "t5-alone", "="),
           Claim("the refiner helps the LLM a lot", "llm-refiner", "llm-alone", ">")]),
    Table("Table 2: the components", "one LLM, no instruction, no refiner",
          [("llm-alone", "LLM alone"), ("llm-refiner", "+ refiner"), ("llm-instruction", "+ instruction"),
           ("llm-instruction-refiner", "+ both")],
          [Claim("+ refiner beats the LLM alone", "llm-refiner", "llm-alone", ">"),
           Claim("+ instruction beats the LLM alone", "llm-instruction", "llm-alone", ">"),
           Claim("+ both beats + refiner", "llm-instruction-refiner", "llm-refiner", ">"),
           Claim("+ both beats + instruction", "llm-instruction-refiner", "llm-instruction", ">")]),
    Table("Table 3: the causal mask in the refiner", "one LLM without the instruction",
          [("llm-refiner", "bidirectional refiner"), ("llm-causal-refiner", "causal refiner")],
          [Claim("putting the causal mask back into the refiner hurts", "llm-refiner", "llm-causal-refiner", ">")]),
    Table("Table 4: the instruction, instruction-tuned vs base LLM", "no refiner (Gemma's features "
          "RMS-normalised, SmolLM2's not: each model's own gain is the comparison)",
          [("llm-alone", "SmolLM2-Instruct, no instruction"), ("llm-instruction", "SmolLM2-Instruct + instruction"),
           ("base-llm-alone", "Gemma 3 270M (base), no instruction"),
           ("base-llm-instruction", "Gemma 3 270M (base) + instruction")],
          [Claim("the instruction helps an instruction-tuned LLM", "llm-instruction", "llm-alone", ">"),
           Claim("the instruction does nothing for a base LLM", "base-llm-instruction", "base-llm-alone", "=")]),
    Table("Table 5: refiner depth and gate", "one LLM without the instruction",
          [("llm-alone", "depth 0"), ("llm-refiner-depth-1", "depth 1"), ("llm-refiner", "depth 2 (default)"),
           ("llm-refiner-depth-3", "depth 3"), ("llm-refiner-no-gate", "depth 2, no gate")],
          [Claim("depth 2 beats depth 1", "llm-refiner", "llm-refiner-depth-1", ">"),
           Claim("depth 3 is no better than depth 2", "llm-refiner-depth-3", "llm-refiner", "="),
           Claim("removing the gate hurts", "llm-refiner", "llm-refiner-no-gate", ">")]),
    Table("Table 6: fusing two causal LLMs", "two LLMs, each with instruction and refiner, the features "
          "RMS-normalised (model.feature_norm: rms)",
          [("llm-instruction-refiner-rms", "SmolLM2 alone"), ("llm2-instruction-refiner", "Gemma 3 270M alone"),
           ("two-llm-concat", "both, concatenated"), ("two-llm-collaborative", "both, collaborative refiner"),
           ("two-llm-collaborative-mean", "both, collaborative, mean modulation")],
          [Claim("concatenating two LLMs beats the first alone", "two-llm-concat", "llm-instruction-refiner-rms", ">"),
           Claim("concatenating two LLMs beats the second alone", "two-llm-concat", "llm2-instruction-refiner", ">"),
           Claim("the collaborative refiner beats concatenation", "two-llm-collaborative", "two-llm-concat", ">"),
           Claim("(not the paper's: a check of our reading) conditioning each branch on its own pooled "
                 "features, as the paper says, beats the mean of the refined outputs",
                 "two-llm-collaborative", "two-llm-collaborative-mean", ">")]),
    Table("The chat template (system prompt + instruction, nothing after the caption)", "with the refiner",
          [("llm-instruction-refiner", "plain instruction"), ("llm-chat-refiner", "chat template + system prompt")],
          [Claim("(not the paper's: the paper puts a system prompt before the instruction and does not ablate it) the chat template "
                 "changes nothing against the plain instruction", "llm-chat-refiner", "llm-instruction-refiner", "=")]),
]
BIAS_FIGURE = [("llm-alone", "LLM alone"), ("llm-refiner", "LLM + refiner"), ("t5-alone", "T5 role alone")]


def overall_variance(record: dict) -> float:
    """Binomial variance of one run's overall score, the mean of K category accuracies:
    sum_k p_k (1 - p_k) / n_k / K^2, each p_k Agresti-Coull adjusted ((x + 2) / (n + 4)),
    which keeps a 0 or 1 accuracy from claiming no uncertainty."""
    categories = record["categories"]
    counts = record.get("counts") or {c: record["images"] / len(categories) for c in categories}
    total = 0.0
    for name, accuracy in categories.items():
        n = counts[name]
        adjusted = (accuracy * n + 2) / (n + 4)
        total += adjusted * (1 - adjusted) / (n + 4)
    return total / len(categories) ** 2


def interval(mean: float, variance: float) -> tuple[float, float]:
    half = Z95 * math.sqrt(variance)
    return max(0.0, mean - half), min(1.0, mean + half)


def by_recipe(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record["recipe"], []).append(record)
    return groups


def seed_variance(records: list[dict], key: str = "overall") -> float:
    """The variance of one run's `key` (the overall score, or the held-out loss) from seed to
    seed, pooled over the recipes with two seeds or more: sum over recipes of the squared
    deviations from the recipe's mean, over sum(seeds - 1). 0 when no recipe has two seeds
    (then only the prompts' noise is counted, and the report says so)."""
    squares, freedom = 0.0, 0
    for group in by_recipe(records).values():
        scores = [r[key] for r in group if key in r]
        if not scores:
            continue
        mean = sum(scores) / len(scores)
        squares += sum((x - mean) ** 2 for x in scores)
        freedom += len(scores) - 1
    return squares / freedom if freedom else 0.0


def aggregate(records: list[dict]) -> dict[str, dict]:
    """Per recipe: seeds, mean and spread of the overall score over seeds, the variance of
    that mean (the held-out prompts' binomial noise plus the pooled seed-to-seed noise over
    the recipe's seeds) and its 95% interval."""
    seeds, loss_seeds = seed_variance(records), seed_variance(records, "heldout_loss")
    out = {}
    for recipe, group in by_recipe(records).items():
        scores = [r["overall"] for r in group]
        mean = sum(scores) / len(scores)
        variance = sum(overall_variance(r) for r in group) / len(group) ** 2 + seeds / len(group)
        bins = []
        for i, bin_ in enumerate(group[0]["bias_bins"]):
            means = [r["bias_bins"][i]["mean"] for r in group if r["bias_bins"][i]["mean"] is not None]
            bins.append({"range": bin_["range"], "count": bin_["count"],
                         "mean": sum(means) / len(means) if means else None})
        out[recipe] = {
            "seeds": sorted(r["seed"] for r in group), "mean": mean, "min": min(scores), "max": max(scores),
            "variance": variance, "interval": interval(mean, variance),
            "images": sum(r["images"] for r in group), "steps": sum(r["steps"] for r in group) / len(group),
            "categories": {c: sum(r["categories"].get(c, 0.0) for r in group) / len(group)
                           for c in CATEGORIES if c in group[0]["categories"]},
            "bias_bins": bins,
            "machines": sorted({machine_label(r.get("hardware", "?")) for r in group}),
            "heldout_loss": (sum(r["heldout_loss"] for r in group) / len(group)
                             if all("heldout_loss" in r for r in group) else None),
            "heldout_variance": loss_seeds / len(group),  # the same rows, times and noise for every run
            "pooled_seed_variance": seeds,  # the same for every recipe: for the report's text
        }
    return out


def machine_label(hardware: str) -> str:
    """A short name of the machine a run recorded: "cuda (NVIDIA H200): sm_90, ..." -> "NVIDIA H200"."""
    return hardware.partition("(")[2].partition(")")[0] or hardware


def verdict(claim: Claim, stats: dict[str, dict], measure: str = "score",
            ) -> tuple[str, float | None, tuple[float, float] | None]:
    """(verdict, difference a - b, its 95% interval) for one claim, judged on the ShapeEval
    score (measure "score") or on the held-out loss ("loss", where lower is better: the
    verdict reads b - a, the difference shown stays a - b)."""
    if claim.a not in stats or claim.b not in stats:
        return "not run", None, None
    a, b = stats[claim.a], stats[claim.b]
    if measure == "loss":
        if a["heldout_loss"] is None or b["heldout_loss"] is None:
            return "not measured", None, None
        shown = a["heldout_loss"] - b["heldout_loss"]
        half = Z95 * math.sqrt(a["heldout_variance"] + b["heldout_variance"])
        text, _, _ = _judge(claim.relation, -shown, half, LOSS_MARGIN)
        return text, shown, (shown - half, shown + half)
    diff = a["mean"] - b["mean"]
    return _judge(claim.relation, diff, Z95 * math.sqrt(a["variance"] + b["variance"]))


def _judge(relation: str, diff: float, half: float, margin: float = MARGIN) -> tuple[str, float, tuple[float, float]]:
    """The verdict on a difference (positive: A better) and the half-width of its 95% interval;
    "changes nothing" needs the interval within +-margin."""
    low, high = diff - half, diff + half
    if relation == ">":
        text = "reproduced" if low > 0 else "contradicted" if high < 0 else "cannot tell at this size"
    else:
        if low > 0 or high < 0:
            text = "contradicted"
        elif -margin <= low and high <= margin:
            text = "consistent"
        else:
            text = "cannot tell at this size"
    return text, diff, (low, high)


def render(stats: dict[str, dict], records: list[dict], machines: list[str], notes: str) -> str:
    seeds = next(iter(stats.values()))["pooled_seed_variance"] if stats else 0.0
    noise = (f"the pooled seed-to-seed sd of one run is {seeds ** 0.5:.3f}" if seeds
             else "no recipe has two seeds yet, so only the prompts' noise is counted")
    lines = ["# The paper's ablations on the shapes world", "",
             "Generated by `python -m sample.ablations` from the runs of `make ablations`",
             "(configs/matrices/ablations.yaml; raw records in docs/ablations.json). Each score is",
             "ShapeEval overall (sample/shapeeval.py, EMA weights, the default sampler) on the first",
             "held-out prompts; **mean** over seeds, **spread** = min-max over seeds, **95%** = the",
             "interval of the mean from the prompts' binomial noise and the seed-to-seed noise pooled",
             f"over all recipes ({noise}). A claim is judged on the difference of two recipes' means",
             "and its 95% interval (sample/ablations.py). PAPER.md states the direction of each of the",
             "paper's results, not its values, so each table puts the paper's claim beside our verdict.", "",
             f"Runs: {len(records)} ({len({r['recipe'] for r in records})} recipes). Machines (the `machine` "
             f"column): {'; '.join(machines) or '-'}.", ""]
    for table in TABLES:
        lines += [f"## {table.title}", "", f"Baseline: {table.baseline}.", "",
                  "| recipe | what | seeds | steps | machine | mean | spread | 95% | position (last bin - first) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for recipe, what in table.rows:
            s = stats.get(recipe)
            if s is None:
                lines.append(f"| {recipe} | {what} | not run | | | | | | |")
                continue
            first, last = s["bias_bins"][0]["mean"], s["bias_bins"][-1]["mean"]
            drop = f"{last - first:+.3f}" if first is not None and last is not None else "-"
            lines.append(f"| {recipe} | {what} | {len(s['seeds'])} | {s['steps']:.0f} | {', '.join(s['machines'])} | "
                         f"{s['mean']:.3f} | {s['min']:.3f}-{s['max']:.3f} | "
                         f"{s['interval'][0]:.3f}-{s['interval'][1]:.3f} | {drop} |")
        if table.claims:
            lines += ["", "| the paper's claim | ShapeEval A - B (95%) | ours, on ShapeEval | "
                      "held-out loss A - B (95%) | ours, on the held-out loss |", "|---|---|---|---|---|"]
            for claim in table.claims:
                cells = []
                for measure, digits in (("score", 3), ("loss", 4)):
                    text, diff, interval = verdict(claim, stats, measure)
                    shown = "-" if diff is None else (f"{diff:+.{digits}f} ({interval[0]:+.{digits}f} to "
                                                      f"{interval[1]:+.{digits}f})")
                    cells += [shown, text]
                lines.append(f"| {claim.text} ({claim.a} vs {claim.b}) | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Every recipe by category", "",
              "Mean over seeds; the held-out loss is the EMA model's flow loss on the same held-out rows,",
              "times and noise for every run (train/matrix.py: `heldout_loss`).", "", comparison(stats)]
    lines += ["", "## Positional bias", "",
              "Attribute binding by where the mention starts in the prompt (mean over seeds):", "",
              "![positional bias](figures/ablations_positional_bias.png)", ""]
    return "\n".join(lines) + "\n" + NOTES_MARKER + "\n" + notes


def write_report(records: list[dict], docs: Path) -> Path:
    stats = aggregate(records)
    machines = sorted({f"{machine_label(r.get('hardware', '?'))} = {r.get('hardware', '?')}, "
                       f"{r.get('precision', '?')}" for r in records})
    out = docs / "ABLATIONS.md"
    notes = out.read_text().partition(NOTES_MARKER)[2].lstrip("\n") if out.is_file() else ""
    out.write_text(render(stats, records, machines, notes))
    (docs / "ablations.json").write_text(json.dumps(records, indent=1) + "\n")
    curves = {label: {"bins": stats[recipe]["bias_bins"]} for recipe, label in BIAS_FIGURE if recipe in stats}
    if curves:
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        plot_bias(curves, docs / "figures" / "ablations_positional_bias.png")
    return out


def comparison(stats: dict[str, dict], baseline: str | None = None) -> str:
    """A markdown table of every recipe (`aggregate`'s stats): seeds, steps, overall with its
    95% interval, the held-out loss (train/matrix.py) and the categories; with a `baseline`,
    also each recipe's difference of mean scores from it with its 95% interval (the recipe study)."""
    if baseline is not None and baseline not in stats:
        raise KeyError(f"no runs of the baseline recipe {baseline!r}")
    categories = [c for c in CATEGORIES if any(c in s["categories"] for s in stats.values())]
    versus = [] if baseline is None else [f"vs {baseline} (95%)"]
    head = ["recipe", "seeds", "steps", "overall", "95%", *versus, "held-out loss", *categories]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for recipe, s in stats.items():
        cells = [recipe, str(len(s["seeds"])), f"{s['steps']:.0f}", f"{s['mean']:.3f}",
                 f"{s['interval'][0]:.3f}-{s['interval'][1]:.3f}"]
        if baseline is not None:
            _, diff, interval = verdict(Claim("", recipe, baseline, ">"), stats)
            cells.append("-" if recipe == baseline else f"{diff:+.3f} ({interval[0]:+.3f} to {interval[1]:+.3f})")
        cells.append("-" if s["heldout_loss"] is None else f"{s['heldout_loss']:.4f}")
        cells += [f"{s['categories'].get(c, 0.0):.2f}" for c in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_losses(run: Path) -> dict[int, float]:
    """{step: training loss} as a run logged it (`logs/metrics.csv`)."""
    import csv

    with open(run / "logs" / "metrics.csv", newline="") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


PAIRED_HEADER = ["| run | steps compared | mean loss | vs {baseline} (same seed) | standard error | relative |",
                 "|---|---|---|---|---|---|"]


def _paired_row(name: str, losses: dict[int, float], reference: dict[int, float], first: int,
                last: int) -> str | None:
    """One row of a paired-loss table: `losses` against `reference` over their common logged
    steps in [first, last]; None if they share fewer than 2."""
    steps = [s for s in losses if first <= s <= last and s in reference]
    if len(steps) < 2:
        return None
    diffs = [losses[s] - reference[s] for s in steps]
    mean = sum(diffs) / len(diffs)
    error = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    base = sum(reference[s] for s in steps) / len(steps)
    return (f"| {name} | {len(steps)} ({steps[0]}-{steps[-1]}) | {sum(losses[s] for s in steps) / len(steps):.4f}"
            f" | {mean:+.4f} | {error:.4f} | {mean / base:+.1%} |")


def paired_loss(out: Path, baseline: str, first: int, last: int) -> str:
    """A table of every run's training loss against `baseline`'s run of the same seed, over the
    logged steps in [first, last] that both reached: mean difference, its standard error, and
    the difference relative to the baseline's mean. A run with no baseline of its seed is named
    under the table; FileNotFoundError if `out` holds no logged run of `baseline` at all."""
    runs = {p.parent.parent.name: train_losses(p.parent.parent) for p in sorted(out.glob("*/logs/metrics.csv"))}
    if not any(name.rpartition("-s")[0] == baseline for name in runs):
        raise FileNotFoundError(f"no logged run of {baseline!r} in {out}")
    lines = [line.format(baseline=baseline) for line in PAIRED_HEADER]
    unpaired = []
    for name, losses in runs.items():
        recipe, _, seed = name.rpartition("-s")
        reference = runs.get(f"{baseline}-s{seed}")
        if recipe == baseline:
            continue
        row = None if reference is None else _paired_row(name, losses, reference, first, last)
        if row is None:
            unpaired.append(name)
        else:
            lines.append(row)
    if unpaired:
        lines.append(f"\nnot compared (no run of {baseline!r} with the same seed, or fewer than 2 common steps): "
                     + ", ".join(unpaired))
    return "\n".join(lines)


def paired_runs(baseline: Path, runs: list[Path], first: int, last: int) -> str:
    """paired_loss for run folders named directly (`runs/<name>`): each run against `baseline`,
    which the caller vouches trained on the same seed, so both drew the same batches, times and
    noise (train/module.py). FileNotFoundError names a folder with no logged losses."""
    for run in [baseline, *runs]:
        if not (run / "logs" / "metrics.csv").is_file():
            raise FileNotFoundError(f"no logged losses at {run / 'logs' / 'metrics.csv'}")
    reference = train_losses(baseline)
    lines = [line.format(baseline=baseline.name) for line in PAIRED_HEADER]
    for run in runs:
        row = _paired_row(run.name, train_losses(run), reference, first, last)
        lines.append(row or f"| {run.name} | fewer than 2 common steps in [{first}, {last}] | - | - | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sample.ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="runs/matrices/ablations/results.json")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--compare", metavar="RECIPE",
                        help="print a table of every recipe against this one instead of writing the docs")
    parser.add_argument("--paired-loss", metavar="RECIPE",
                        help="print every run's logged training loss against this recipe's run of the same seed")
    parser.add_argument("--paired-runs", nargs="+", metavar="RUN_DIR",
                        help="the same for run folders: the first is the baseline, every other is compared with it "
                             "(train them with one seed)")
    parser.add_argument("--steps", nargs=2, type=int, default=[0, 10**9], metavar=("FROM", "TO"),
                        help="--paired-loss / --paired-runs: the logged steps compared")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if args.paired_loss or args.paired_runs:
        try:
            if args.paired_runs:
                if len(args.paired_runs) < 2:
                    parser.error("--paired-runs: a baseline folder and at least one run folder")
                baseline, *runs = (Path(p) for p in args.paired_runs)
                print(paired_runs(baseline, runs, *args.steps))
            else:
                print(paired_loss(results.parent, args.paired_loss, *args.steps))
        except FileNotFoundError as err:
            print(f"ablations: error: {err}", file=sys.stderr)
            return 2
        return 0
    if not results.is_file():
        print(f"ablations: error: no results at {results}; run the matrix first", file=sys.stderr)
        return 2
    records = json.loads(results.read_text())
    if args.compare:
        print(comparison(aggregate(records), args.compare))
        return 0
    out = write_report(records, Path(args.docs))
    print(f"ablations: {len(records)} runs -> {out}, {Path(args.docs) / 'ablations.json'} and "
          f"{Path(args.docs) / 'figures' / 'ablations_positional_bias.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
