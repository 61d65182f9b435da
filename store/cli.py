"""What every command shares: process defaults, `--config`/`--set`, quiet library logs.

Import this module before torch. Importing it sets the process defaults that must be in
the environment before the OpenMP runtime loads (with torch), unless the user set them:

- `OMP_WAIT_POLICY=PASSIVE`: idle OpenMP threads sleep instead of spinning. Measured on
  2 cores (docs/BENCHMARKS.md): with one busy neighbour process, a spinning 2-thread team
  trains at 0.29 of its idle speed and a passive one at 0.57; idle, passive costs ~10%.
- offline Hugging Face and no tokenizer fork warnings: nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import warnings

PROCESS_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
for _key, _value in PROCESS_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


def config_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every command takes: --config and --set."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=500")
    return parser


def quiet_libraries() -> None:
    """Errors only from transformers, Lightning and Ray: their reports would bury a command's own."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("ray", "ray.data", "lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Ray forks its helpers before any Lance dataset is opened in this process; the data
    # loader starts its workers with spawn (train/data.py). The warning does not apply.
    warnings.filterwarnings("ignore", message="lance is not fork-safe")
    # A small job with fewer blocks than encoder actors: true, and harmless.
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
    # Training: the EMA copy is in eval mode on purpose; the LeafSpec notice is Lightning's own.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # Lightning's summary table sizes the model as fp32 under bf16-mixed and says so; the
    # chosen precision is printed by `train` itself.
    warnings.filterwarnings("ignore", message=".*is not supported by the model summary.*")


@contextlib.contextmanager
def stderr_without(*notices: str):
    """Drop the lines containing any of `notices` that native code writes to fd 2 meanwhile.

    For Ray's C++ core: with RAY_BACKEND_LOG_LEVEL set (embed/job.py sets it to hide a
    spurious error), `ray.init` prints "Set ray log level from environment variable ..."
    from C++, below Python's logging. fd 2 goes to a temporary file for the duration and
    every other line is written back, in order, when the block ends (also on an error).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(notice in line for notice in notices)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
