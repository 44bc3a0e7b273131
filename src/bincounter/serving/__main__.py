"""``python -m bincounter.serving``: the model server in the foreground (what the containers run)."""

import sys

from bincounter.serving.app import main

sys.exit(main())
