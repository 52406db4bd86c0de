"""Fixtures of the adversarial suite: a real echod wrapped in a :class:`Harness`."""

from __future__ import annotations

import functools
import itertools
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stress.stresskit import Harness, raise_own_nofile


@pytest.fixture(autouse=True)
def _many_descriptors() -> None:
    """Thousands of test clients need thousands of descriptors in this process."""
    raise_own_nofile()


@pytest.fixture
def echod(
    spawn_echod: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., Harness]]:
    """``echod(*args, preexec_fn=None)``: a real echod, warmed up, its baseline taken.

    It has a control socket (``Harness.ctl``) so tests can read ``/stats``.

    ``preexec_fn`` runs in the child before exec (to lower its rlimits); it is
    passed to the shared fixture's Popen for that one spawn only.
    """

    def start(*args: str, preexec_fn: Callable[[], None] | None = None, **kwargs: Any) -> Harness:
        ctl = str(tmp_path / f"ctl{next(serial)}.sock")
        args = ("--control-socket", ctl, *args)
        if preexec_fn is None:
            return Harness(spawn_echod(*args, **kwargs), ctl)
        with monkeypatch.context() as patch:
            patch.setattr(
                subprocess, "Popen", functools.partial(subprocess.Popen, preexec_fn=preexec_fn)
            )
            proc = spawn_echod(*args, **kwargs)
        return Harness(proc, ctl)

    serial = itertools.count()

    yield start
