"""echod.metrics without a server: the process metrics where /proc/stat is hidden."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import ProcessCollector

from echod.metrics import SandboxProcessCollector


def test_process_metrics_survive_a_proc_without_stat(tmp_path: Path) -> None:
    # What ProcSubset=pid leaves: the process's own directory, no /proc/stat.
    (tmp_path / "self").symlink_to(f"/proc/{os.getpid()}")
    assert list(ProcessCollector(proc=str(tmp_path), registry=None).collect()) == []  # the gap
    metrics = {
        m.name: m for m in SandboxProcessCollector(proc=str(tmp_path), registry=None).collect()
    }
    assert metrics["process_cpu_seconds"].samples[0].value > 0
    started = metrics["process_start_time_seconds"].samples[0].value
    assert time.time() - 24 * 3600 < started <= time.time()  # this process started today
    real = {m.name: m for m in ProcessCollector(registry=None).collect()}
    real_start = real["process_start_time_seconds"].samples[0].value
    assert abs(started - real_start) < 2  # /proc/stat's btime is whole seconds
