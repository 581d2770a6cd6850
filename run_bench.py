"""Hydra entry point: compose the config and hand it to the sweep. See README.md for the CLI."""

import gc
import sys

import hydra

from qna_bench.config import register_configs

register_configs()
_composed = False


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(cfg) -> None:
    # Imported here, not above: each measuring worker, a spawned process, imports this file again, and
    # needs only its own layers (the sweep loads every layer and torch: seconds a worker).
    from qna_bench.sweep import run_from_config

    global _composed
    _composed = True
    run_from_config(cfg)


if __name__ == "__main__":
    from qna_bench.sweep import EXIT_BAD_INPUT, check_results_dir_argument

    check_results_dir_argument(sys.argv[1:])
    try:
        main()
    except SystemExit as exit_:
        # Hydra exits 1 after printing why an override could not be composed (unknown key, bad syntax):
        # that is bad input too.
        if exit_.code == 1 and not _composed:
            sys.exit(EXIT_BAD_INPUT)
        raise
    # The interpreter's exit collects every object that torch and the layers' libraries made, about a
    # second; frozen, they are left to the end of the process.
    gc.freeze()
