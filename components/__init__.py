"""Thin KFP v2 components over ``bincounter.launch``: one file per stage.

Each takes its stage's typed config as ONE struct parameter, ``config: dict`` (the pydantic
model's ``params()``), validates it with the stage's own model on entry (unknown or misspelled
fields fail at once), records the validated config in its output artifact's metadata, and
calls the library. Images are set per task at compile time (``pipelines.runner``); ``IMAGE``
is only the decorator's placeholder.
"""

from bincounter import __version__
from bincounter.config import IMAGE_REPOSITORY

IMAGE = f"{IMAGE_REPOSITORY}:{__version__}"
