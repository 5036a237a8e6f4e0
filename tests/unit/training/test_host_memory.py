"""keep_freed_memory: a large block freed and allocated again is reused, not faulted in afresh from the kernel."""
import subprocess
import sys

import pytest

# In a fresh interpreter (the setting is process-wide): allocate and touch 64 MiB, free it, allocate it again, and
# print the minor page faults of the second allocation. 64 MiB is 16384 pages of 4 KiB.
PROBE = """
import resource, sys
from finetune.training.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
block = bytearray(64 << 20); block[::4096] = b"x" * len(block[::4096]); del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = bytearray(64 << 20); block[::4096] = b"x" * len(block[::4096])
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_allocation_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_memory_is_reused_without_page_faults():
    _, default_faults = second_allocation_faults("default")
    kept, kept_faults = second_allocation_faults("keep")
    assert default_faults > 16384 // 2  # glibc's default: a fresh mmap, every page faults again
    assert kept == "True" and kept_faults < 16384 // 10  # the freed heap block is reused
