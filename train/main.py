"""Train a 3D segmentation model, optionally started from 2D weights.

  python -m train.main --init=scale                 # the MNI152 demo, start to finish
  python -m train.main --init=acs --pretrained=imagenet --model=efficientnet_lite0_unet
  python -m train.main --preset=gpu --dataset=msd:Task02_Heart --workdir=runs/heart

Rerunning with the same --workdir resumes from its newest good checkpoint.
Multi-process runs: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or launch under Slurm / Open MPI) and start one process per host.
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging

from train import config as config_lib

config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)  # so --help lists them


def _one_line(err: flags.Error) -> str:
    # absl says "flag --steps=abc: Expect argument to be a string or int" or
    # "Unknown command line flag 'foo'"; reduce both to "error: --flag: ...".
    text = str(err).strip().splitlines()[0]
    match = re.match(r"flag --(\w+)=.*?: (.*)", text)
    if match:
        return f"error: --{match.group(1)}: {match.group(2)}"
    match = re.search(r"flag '(\w+)'", text)
    if match:
        return f"error: --{match.group(1)}: unknown flag"
    return f"error: {text}"


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad one exits with status 2 and one line naming it."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        print(_one_line(err), file=sys.stderr)
        sys.exit(2)
    except SystemExit:
        # absl exits with status 1 after printing --help; asking for help is no failure.
        if any(a.lstrip("-").split("=")[0] in ("help", "helpfull", "helpshort", "h", "?") for a in argv[1:]):
            sys.exit(0)
        raise


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from train import run, trainer  # after flag parsing: --help stays fast and JAX untouched

    try:
        trainer.maybe_initialize_distributed()
        run.train_and_evaluate(config_lib.from_flags())
    except config_lib.ConfigError as err:
        sys.exit(err.line())
    except trainer.NonFiniteLoss as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
