"""The README's test command installs what .ci/run installs, so the two cannot drift.

A developer on a fresh machine runs the README's second command; CI runs
``.ci/run``. A Debian package that only one of them names makes the other
one skip or fail a test.
"""

from __future__ import annotations

import re

from tests.helpers import ROOT


def _ci_packages() -> set[str]:
    text = (ROOT / ".ci" / "run").read_text()
    names: set[str] = set()
    for group in re.findall(r"need\+=\(([^)]*)\)", text):
        names.update(group.split())
    return names


def _readme_test_packages() -> set[str]:
    text = (ROOT / "README.md").read_text()
    command = next(line for line in text.splitlines() if "pip install -e '.[test]'" in line)
    installed = re.search(r"apt-get install -y ([^&]+)&&", command)
    assert installed is not None, command
    return set(installed.group(1).split())


def test_readme_test_command_installs_every_package_ci_installs() -> None:
    ci = _ci_packages()
    assert ci, "no need+=(...) groups found in .ci/run"
    # util-linux and libc6-dev come with every Debian system and gcc respectively.
    missing = ci - _readme_test_packages() - {"util-linux", "libc6-dev"}
    assert not missing, f"README's test command lacks {sorted(missing)}"
