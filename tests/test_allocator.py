"""metacl.allocator: `cpu_allocator=tuned` keeps tensor-sized blocks on glibc's heap."""

import subprocess
import sys

import pytest

from metacl.allocator import _glibc, set_cpu_allocator
from metacl.errors import ConfigError

# In a fresh process (glibc as it starts, whatever this test process did before): apply the
# setting, then count glibc's mmapped blocks (struct mallinfo2's hblks) around a 4 MiB tensor,
# the size of one activation of a 75-image Conv4 layer.
PROBE = """
import ctypes, sys, torch
from metacl.allocator import _glibc, set_cpu_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = _glibc()
libc.mallinfo2.restype = MallInfo2
changed = set_cpu_allocator(sys.argv[1])
before = libc.mallinfo2().hblks
block = torch.empty(1024 * 1024)
print(changed, libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(_glibc() is None or not hasattr(_glibc(), "mallinfo2"),
                    reason="the C library is not glibc >= 2.33 (the setting changes nothing)")
@pytest.mark.parametrize(("setting", "expected"), [("system", "False 1"), ("tuned", "True 0")])
def test_a_4mb_tensor_gets_its_own_mmap_unless_tuned(setting, expected):
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == expected.split()


def test_an_unknown_setting_is_refused():
    with pytest.raises(ConfigError, match="cpu_allocator='jemalloc' is invalid; allowed: tuned, "
                                          "system"):
        set_cpu_allocator("jemalloc")
