"""``python -m attnzoo`` (also ``accelerate launch -m attnzoo ...``): the ``attnzoo`` command.

``import attnzoo`` loads no torch, so :func:`attnzoo.cli.main` still sets ``OMP_WAIT_POLICY`` (and
its other process settings) before torch is imported.
"""
import sys

from .cli import main

sys.exit(main())
