"""Train a 3D segmentation model, optionally started from 2D weights.

  python -m train.main --init=scale                 # the MNI152 demo, start to finish
  python -m train.main --init=acs --pretrained=imagenet --model=efficientnet_lite0_unet
  python -m train.main --preset=gpu --dataset=msd:Task02_Heart --workdir=runs/heart

Rerunning with the same --workdir resumes from its newest good checkpoint.
Multi-process runs: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or launch under Slurm / Open MPI) and start one process per host.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from train import cli
from train import config as config_lib

config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)  # so --help lists them


@cli.entry_point
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; every setting is a --flag (see --help)")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    # Settings are checked before JAX is imported, so a bad flag costs the user no wait.
    config = config_lib.from_flags()
    from train import run, trainer  # after flag parsing: --help stays fast and JAX untouched

    trainer.maybe_initialize_distributed()
    trainer.use_compilation_cache(config.cache_path)
    run.train_and_evaluate(config)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_absl_flags)
