"""Top-level conftest: loads the lab plugin (tests marked `vm` run inside the lab guest).

Keep this file to plugin loading; fixtures belong in the conftest of the test subdir that
uses them, or (shared across suites) in a plugin module listed here: tests/serving.py has
``no_fd_leak``, tests/labharness.py the lab-guest daemon fixtures. Never import a conftest:
what tests share lives in a module (tests/<suite>/support.py, tests/serving.py).
"""

pytest_plugins = ["pytest_labvm", "pytester", "tests.labharness", "tests.serving"]
