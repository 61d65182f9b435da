"""Sampling settings rescored on saved weights: ShapeEval of one model under several
(cfg_scale, cfg_interval, steps, solver, weights) settings, side by side in one run.

Training fixes the weights; these settings are chosen at evaluation. Each setting generates
one image per held-out caption with the same noise (sample.seed) through `make eval`'s own
code (sample/eval.py: `run_eval`, the scorer unchanged), its files written to
<run>/sampling/<setting>. The floor and ceiling do not depend on these settings and are
left out (`make eval` gives them). A setting's seconds include loading its weights and
prompt encoders (a few seconds).

    python bench/sampling.py --config configs/long-plain.yaml [--limit 512] \
        [--cfg 3 2 4.5] [--cfg-interval 0,1 0.1,0.9] [--steps 20 40] [--solver heun] [--weights ema raw] [--json]

Every combination of the listed values is scored; the first value of each list is the
baseline the others are compared with. The 95% interval of each overall score is the
binomial one of docs/ABLATIONS.md (sample/ablations.py: `overall_variance`).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]  # bench/train.py shadows `train`
sys.path.insert(0, str(BENCH_DIR.parent))

from store import cli  # noqa: E402  (first: process defaults before torch loads)

from sample.ablations import interval, overall_variance  # noqa: E402
from sample.eval import run_eval  # noqa: E402
from sample.shapeeval import CATEGORIES  # noqa: E402
from store.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser("python bench/sampling.py", __doc__)
    parser.add_argument("--limit", type=int, default=512, help="the first N held-out captions")
    parser.add_argument("--cfg", type=float, nargs="+", help="cfg scales (default: the config's)")
    parser.add_argument("--cfg-interval", nargs="+", metavar="LOW,HIGH",
                        help="times t (1 noise, 0 data) where guidance applies (default: the config's)")
    parser.add_argument("--steps", type=int, nargs="+", help="solver steps (default: the config's)")
    parser.add_argument("--solver", nargs="+", help="solvers (default: the config's)")
    parser.add_argument("--weights", nargs="+", choices=("ema", "raw"), help="default: the config's")
    parser.add_argument("--checkpoint", type=Path, help="exported weights (default: <run>/checkpoints)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    s = load_config(args.config, args.overrides).sample
    intervals = [s.cfg_interval] if not args.cfg_interval else [
        [float(v) for v in text.split(",")] for text in args.cfg_interval]
    grid = itertools.product(args.weights or ["ema" if s.use_ema else "raw"], args.cfg or [s.cfg_scale], intervals,
                             args.steps or [s.steps], args.solver or [s.solver])

    records = []
    for weights, cfg, (t_low, t_high), steps, solver in grid:
        config = load_config(args.config, [*args.overrides, f"sample.use_ema={weights == 'ema'}",
                                           f"sample.cfg_scale={cfg}", f"sample.cfg_interval=[{t_low},{t_high}]",
                                           f"sample.steps={steps}", f"sample.solver={solver}"])
        started = time.perf_counter()
        span = "" if (t_low, t_high) == (0.0, 1.0) else f"-t{t_low:g}-{t_high:g}"
        out = config.run_path / "sampling" / f"{weights}-cfg{cfg:g}{span}-{solver}{steps}"
        result = run_eval(config, args.checkpoint, out, args.limit, args.device, progress=False,
                          references=("model",))
        seconds = time.perf_counter() - started
        scores = result["scores"]["model"]
        low, high = interval(scores["overall"], overall_variance(scores))
        about = json.loads((result["out"] / "shapeeval.json").read_text())["settings"]
        records.append({"weights": weights, "cfg_scale": cfg, "cfg_interval": [t_low, t_high], "steps": steps,
                        "solver": solver,
                        "overall": scores["overall"], "interval95": [low, high],
                        "categories": scores["categories"], "counts": scores["counts"],
                        "seconds": seconds, "train_step": about["train_step"], "rows": result["rows"]})
        print(f"{weights} cfg {cfg:g} in [{t_low:g}, {t_high:g}] {solver} {steps} steps: overall {scores['overall']:.3f} "
              f"({low:.3f}-{high:.3f}) in {seconds:.0f} s", flush=True)

    base = records[0]["overall"]
    shown = [c for c in CATEGORIES if c in records[0]["categories"]]
    print(f"\n{config.run_path}, weights of step {records[0]['train_step']}, "
          f"{records[0]['rows']} held-out captions")
    print(f"{'weights':<8}{'cfg':>6}{'t range':>10}{'solver':>8}{'steps':>6}{'overall':>9}{'95%':>14}{'vs first':>9}"
          + "".join(f"{c[:12]:>13}" for c in shown) + f"{'seconds':>9}")
    for r in records:
        low, high = r["interval95"]
        span = f"{r['cfg_interval'][0]:g}-{r['cfg_interval'][1]:g}"
        print(f"{r['weights']:<8}{r['cfg_scale']:>6g}{span:>10}{r['solver']:>8}{r['steps']:>6}{r['overall']:>9.3f}"
              f"{f'{low:.3f}-{high:.3f}':>14}{r['overall'] - base:>+9.3f}"
              + "".join(f"{r['categories'][c]:>13.3f}" for c in shown) + f"{r['seconds']:>9.0f}")
    if args.json:
        print(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
