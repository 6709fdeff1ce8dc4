"""glibc's malloc settings for CPU training (the `cpu_allocator` config key).

PyTorch's CPU tensors come from the C library's malloc. With glibc's defaults, a block larger
than the mmap threshold (128 KiB at start, raised as large blocks are freed) gets its own
``mmap`` and is returned to the kernel when freed, and free memory above ``M_TRIM_THRESHOLD``
at the top of the heap is trimmed. Training loops allocate and free the same activation-sized
blocks (a few MB) thousands of times, so each one is paid again as fresh zeroed pages and page
faults. Measured on the 2-core VM: one MAML meta-batch with Omniglot shapes took 0.68-0.90 s
untouched and 0.51-0.54 s with ``tuned`` (benchmarks/bench_maml.py, docs/fewshot.md).

``tuned`` keeps blocks up to 32 MiB (the largest threshold glibc allows on 64-bit) on the heap
and trims it only above 1 GiB of free memory: the process may hold on to up to that much it no
longer uses. ``system`` changes nothing: glibc as the process started. glibc cannot be put back
to that once tuned (setting its start values by hand also stops its own adjustment, and was
3x slower than either here), so in a multirun whose jobs share one process, a ``system`` job
after a ``tuned`` one runs tuned. Other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from metacl.errors import ConfigError

ALLOCATOR_SETTINGS = ("tuned", "system")

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_TUNED = {_M_MMAP_THRESHOLD: 32 * 1024 * 1024, _M_TRIM_THRESHOLD: 1 << 30}


@functools.cache
def _glibc():
    """glibc, or None where the C library is another one."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    return libc


def check_cpu_allocator(setting) -> None:
    """One-line ConfigError unless `setting` is one of ALLOCATOR_SETTINGS."""
    if setting not in ALLOCATOR_SETTINGS:
        raise ConfigError(f"cpu_allocator={setting!r} is invalid; allowed: "
                          f"{', '.join(ALLOCATOR_SETTINGS)}")


def set_cpu_allocator(setting: str = "tuned") -> bool:
    """Apply `setting` (tuned | system); False where nothing was changed."""
    check_cpu_allocator(setting)
    libc = _glibc() if setting == "tuned" else None
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in _TUNED.items())
