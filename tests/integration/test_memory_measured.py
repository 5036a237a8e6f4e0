"""The planner's model-state lines against what real DeepSpeed allocates on 2 CPU ranks (gloo).

One launch of bench/memory_validation.py trains one step of a tiny and a mid-size GPT-J under ZeRO-2
and ZeRO-3, in fp32 and bf16, and reads, per rank, the parameter partitions, gradient partitions and optimizer states
(fp32 master + exp_avg + exp_avg_sq) from DeepSpeed's optimizer; each must be within 10% of the estimate.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.slow
def test_model_state_estimates_match_deepspeed_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "bench" / "memory_validation.py"), "--device", "cpu", "--world", "2",
           "--sizes", "tiny,mid", "--stages", "2,3", "--precision", "fp32,bf16", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.is_file(), f"the validation run wrote no results:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    rows = json.loads(out.read_text())["rows"]

    cases = {(r["size"], r["stage"], r["precision"]) for r in rows}
    assert cases == {(size, stage, p) for size in ("tiny", "mid") for stage in (2, 3) for p in ("fp32", "bf16")}
    for case in cases:
        components = {r["component"] for r in rows if (r["size"], r["stage"], r["precision"]) == case}
        assert {"parameters", "gradients", "optimizer states"} <= components, (case, components)
    # ZeRO-3 partitions parameters across the 2 ranks, ZeRO-2 keeps them whole; bf16 halves them.
    params = {(r["size"], r["stage"], r["precision"]): r["measured_bytes"] for r in rows if r["component"] == "parameters"}
    assert params[("mid", 3, "fp32")] == pytest.approx(params[("mid", 2, "fp32")] / 2, rel=0.02)
    assert params[("mid", 2, "bf16")] == pytest.approx(params[("mid", 2, "fp32")] / 2, rel=1e-3)

    off = [r for r in rows if abs(r["error"]) > 0.10]
    assert not off, "estimates off by more than 10%:\n" + "\n".join(map(str, off))
    assert proc.returncode == 0, proc.stderr[-4000:]
