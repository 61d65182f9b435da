"""`python -m train --config configs/default.yaml`: train refiners + LI-DiT from the cache.

No LLM is loaded: the text side reads the cached features. A rerun resumes from
`<run>/checkpoints/last.ckpt` (use --fresh to start over). A config with `train.stages` (a
curriculum) trains its stages in order, skipping the ones done before (train/curriculum.py).
"""

from __future__ import annotations

from store import cli  # first: process defaults before torch loads (store/cli.py)
import sys

from store.config import ConfigError, load_config, stage_configs
from store.reader import CacheError
from train.curriculum import pick_stage, run_curriculum, summary as curriculum_summary
from train.run import run_train


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser("python -m train", __doc__)
    parser.add_argument("--fresh", action="store_true",
                        help="ignore an existing last.ckpt (a curriculum: retrain every stage)")
    parser.add_argument("--stage", metavar="NAME|N",
                        help="train this one stage of a curriculum (train.stages), from the weights of the "
                             "stage before")
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    try:
        config = load_config(args.config, args.overrides)
        stages = stage_configs(config)
        if args.stage is None and len(stages) > 1:
            records = run_curriculum(args.config, args.overrides, fresh=args.fresh)
            print(curriculum_summary(records, stages[-1]))
            return 0
        if args.stage is not None:
            config = stages[pick_stage(config, args.stage)]
        summary = run_train(config, fresh=args.fresh)
    except (ConfigError, CacheError) as err:
        print(f"train: error: {err}", file=sys.stderr)
        return 2
    if summary["rank"] != 0:  # one summary: the DDP processes Lightning started return here too
        return 0
    print(f"train: {summary['steps']} steps in {summary['seconds']:.0f} s, last loss {summary['loss']:.4f}, "
          f"{summary['parameters'] / 1e6:.1f}M parameters")
    print(f"  checkpoint and safetensors weights in {summary['checkpoints']}; loss and score curves "
          f"(curves.png) in {summary['logs']}")
    if summary["shapeeval"]:
        print(summary["shapeeval"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
