"""Thin KFP v2 components over ``bincounter.launch``: one file per stage.

All run on the project's image (``dockerfiles/Dockerfile``); set ``BINCOUNTER_IMAGE`` before
compiling to use your own registry.
"""

import os

IMAGE = os.environ.get("BINCOUNTER_IMAGE", "ghcr.io/bincounter/bincounter:0.1.0")
