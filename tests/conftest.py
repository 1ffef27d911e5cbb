"""Top-level conftest: loads the lab plugin (tests marked `vm` run inside the lab guest).

Keep this file to plugin loading; fixtures belong in the conftest of the test subdir that
uses them.
"""

pytest_plugins = ["pytest_labvm", "pytester", "tests.labharness"]
