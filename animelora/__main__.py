"""``python -m animelora``: the same command line as the ``animelora`` script.

Launchers that start one Python process per GPU (``accelerate launch``, ``torchrun``) take a
module, not a script, so this is the form the multi-GPU docs use.
"""
import sys

from animelora.cli import main

if __name__ == "__main__":
    sys.exit(main())
