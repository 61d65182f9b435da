"""`python -m embed --config configs/default.yaml`: fill the feature cache (stage 1)."""

from __future__ import annotations

from store import cli  # first: process defaults before torch loads (store/cli.py)
import sys

from embed.codecs import CodecError
from embed.encoder import EncoderError
from embed.sources import SourceError
from store.config import ConfigError, load_config
from store.writer import CacheMismatch


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser("python -m embed", __doc__)
    parser.add_argument("--limit", type=int, default=None, help="embed only the first N items")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cli.quiet_libraries()
    from embed.job import run_embed

    try:
        config = load_config(args.config, args.overrides)
        summary = run_embed(config, limit=args.limit, progress=not args.quiet)
    except (ConfigError, EncoderError, SourceError, CodecError, CacheMismatch) as err:
        print(f"embed: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
