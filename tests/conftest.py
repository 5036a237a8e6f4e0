"""Fixtures for every test directory."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

TESTS = Path(__file__).resolve().parent
# The tests that compare numbers with a reference (transformers), another layout, a resumed run or DeepSpeed's own
# byte counts. `make test-cpus` runs them again under other CPUs' kernels (docs/testing.md): their tolerances must
# follow from the arithmetic, not from the CPU they were written on. A new such test belongs here.
NUMERICAL_TESTS = (
    "unit/",
    "integration/test_layout_invariance.py", "integration/test_elastic_resume.py",
    "integration/test_fault_tolerance.py", "integration/test_zero3_loading.py", "integration/test_lora_zero.py",
    "integration/test_packing_chunked_loss.py", "integration/test_train_tasks.py", "integration/test_train_qa.py",
    "integration/test_nvme_offload.py", "integration/test_memory_measured.py",
    "integration/tools/test_export_checkpoints.py", "integration/test_qlora_layout_invariance.py",
    "integration/test_qlora_zero3.py", "integration/test_qlora_train.py", "slurm/test_slurm_multinode.py",
    "integration/test_fused_training.py", "integration/test_compiled_training.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.resolve().relative_to(TESTS).as_posix().startswith(NUMERICAL_TESTS):
            item.add_marker(pytest.mark.numerics)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def run_ranks() -> Callable[..., list[str]]:
    """`run_ranks(script, *args, world=2, timeout=300, env=None)`: run `python script *args` as `world` CPU ranks
    (gloo), each with the torch.distributed env a launcher sets (and `env`'s variables); fails the test with a
    rank's log if any exits non-zero.

    The script's ranks should call `finetune.distributed.init_distributed()`: it tears the process group down at
    exit, without which gloo's threads can abort the interpreter ("terminate called without an active exception").
    """

    def _run(script: Path | str, *args: str, world: int = 2, timeout: float = 300,
             env: dict[str, str] | None = None) -> list[str]:
        port = free_port()
        env = {**os.environ, **(env or {}), "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen([sys.executable, str(script), *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for r in range(world)
        ]
        try:
            logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
        for rank, (proc, log) in enumerate(zip(procs, logs)):
            assert proc.returncode == 0, f"rank {rank} of {script} failed (exit {proc.returncode}):\n{log[-6000:]}"
        leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # 66 MB of RAM each
        assert not leaked, f"{script} left {[p.name for p in leaked]} in /dev/shm"
        return logs

    return _run
