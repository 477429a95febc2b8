"""The ``ctxvec`` command line (click). Prints for people; the library itself only logs."""

import ctxvec.cli.serve  # noqa: F401  (registers its command)
import ctxvec.cli.training  # noqa: F401  (registers its commands)
import ctxvec.cli.vectors  # noqa: F401  (registers its commands)
from ctxvec.cli.app import main

__all__ = ["main"]
