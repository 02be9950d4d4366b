"""vermin (the minimum-Python-version checker) run by the current interpreter.

Its console script lives beside the .venv's interpreter only; the unprivileged copy of the tests
(scripts/unit-tests-unprivileged) has the package but no console scripts, so run its entry point.
"""

from __future__ import annotations

import sys

VERMIN = [sys.executable, "-c", "import sys; from vermin import main; sys.argv[0] = 'vermin'; sys.exit(main())"]
