"""``python -m iommud`` / the ``iommud`` script: hands over to ``iommud.app.main``."""

from __future__ import annotations

import sys

from iommud.app import main

if __name__ == "__main__":
    sys.exit(main())
