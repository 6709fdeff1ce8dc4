"""GPU suite (`make test-gpu`): skipped where no CUDA device is visible. Prints the peak GPU
memory of each test and of the whole suite at the end."""

from __future__ import annotations

import time

import pytest
import torch

CUDA = torch.cuda.is_available()
_peaks: dict[str, float] = {}
_started = time.perf_counter()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not CUDA:
                item.add_marker(pytest.mark.skip(reason="no CUDA device visible"))


@pytest.fixture(autouse=True)
def _gpu_setup(request):
    """TF32 off (CPU and GPU results compare at float32 precision); peak memory per test."""
    if not CUDA:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats()
    yield
    _peaks[request.node.nodeid] = torch.cuda.max_memory_allocated() / 2**20


def pytest_terminal_summary(terminalreporter):
    if not _peaks:
        return
    name, peak = max(_peaks.items(), key=lambda kv: kv[1])
    stats = terminalreporter.stats
    terminalreporter.write_line(
        f"GPU suite: {len(stats.get('passed', []))} passed, {len(stats.get('failed', []))} "
        f"failed, {len(_peaks)} cases on {torch.cuda.get_device_name()}, "
        f"{time.perf_counter() - _started:.0f} s; peak GPU memory {peak:.0f} MiB ({name})")
