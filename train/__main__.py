"""`python -m train --config configs/default.yaml`: train refiners + LI-DiT from the cache.

No LLM is loaded: the text side reads the cached features. A rerun resumes from
`<run>/checkpoints/last.ckpt` (use --fresh to start over).
"""

from __future__ import annotations

from store import cli  # first: process defaults before torch loads (store/cli.py)
import sys

from store.config import ConfigError, load_config
from store.reader import CacheError
from train.run import run_train


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser("python -m train", __doc__)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing last.ckpt")
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    try:
        config = load_config(args.config, args.overrides)
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
