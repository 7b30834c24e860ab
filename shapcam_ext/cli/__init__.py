"""The ``shapcam`` command line: explain images with Shap-CAM and report the installation.

Everything in this subpackage serves the command only (argument parsing, model loading, image
decoding, figures, output files, torchrun sharding); the library API is :mod:`shapcam_ext`.
``main`` is the console entry point and what ``python -m shapcam_ext`` runs.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from shapcam_ext.cli import distributed
from shapcam_ext.cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, CommandError
from shapcam_ext.cli.logs import LOGGER, command_logging
from shapcam_ext.cli.parser import build_parser

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``shapcam`` with ``argv`` (default: the process's arguments); returns the exit status.

    0 on success, 1 if the setup or any image failed, 2 for a usage error (argparse exits with
    it), 130 when interrupted. Diagnostics go to stderr, one line each; records to stdout. Under
    torchrun only rank 0 reports: it prints every process's records and errors, and the other
    ranks show errors of their own only.
    """
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    if distributed.world()[0] > 0:
        level = max(level, logging.ERROR)
    with command_logging(level):
        try:
            return args.run(args)
        except CommandError as err:
            logging.getLogger(LOGGER).error("%s", err)
            return EXIT_FAILED
        except KeyboardInterrupt:
            logging.getLogger(LOGGER).error("interrupted")
            return EXIT_INTERRUPTED
