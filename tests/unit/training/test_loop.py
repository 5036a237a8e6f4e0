"""The loop's non-finite guard on a real one-process DeepSpeed engine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# A real one-process DeepSpeed engine (fp32, no ZeRO: a plain torch AdamW that DeepSpeed does not check for
# non-finite gradients) in a subprocess, so that no process group outlives the test.
GUARD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from finetune import distributed
    from finetune.config import OptimConfig, SchedulerConfig, TrainerConfig
    from finetune.distributed import DistInfo
    from finetune.training.engine import build_ds_config, initialize, load_ds_json
    from finetune.training.errors import NonFiniteLossError
    from finetune.training.loop import _NonFiniteGuard

    distributed.init_distributed()
    trainer = TrainerConfig(max_steps=10, micro_batch_size=2, precision="fp32", max_nonfinite_steps=2)
    base, source = load_ds_json("ds_configs/zero0.json")
    ds = build_ds_config(base, source=source, trainer=trainer, optim=OptimConfig(lr=0.1),
                         scheduler=SchedulerConfig(name="constant", warmup_steps=1), world_size=1, total_steps=10,
                         accelerator="cpu")
    torch.manual_seed(0)
    engine = initialize(torch.nn.Linear(4, 1), ds, weight_decay=0.0)
    guard = _NonFiniteGuard(engine, trainer, DistInfo(0, 1, 0))
    x = torch.randn(2, 4)
    report = {"own_check": guard.own_check}
    for step in (1, 2, 3, 4, 5):
        before = [p.detach().clone() for p in engine.module.parameters()]
        loss = engine(x).pow(2).mean() * (float("nan") if step >= 4 else 1.0)
        engine.backward(loss)
        guard.before_update(loss.detach())
        engine.step()
        report[step] = {
            "applied": guard.after_update(step),
            "changed": any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters())),
            "finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()),
            "skipped": engine.skipped_steps,
        }
        try:
            guard.stop_at_limit(step, last_complete=lambda: "CKPT")
        except NonFiniteLossError as err:
            report["error"] = str(err)
            break
    print(json.dumps(report))
""")


def test_nonfinite_steps_are_skipped_then_stop_the_run_with_a_plain_torch_optimizer():
    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", GUARD_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["own_check"] is True
    for step in ("1", "2", "3"):  # finite steps update from the first on (the warmup's first rate is not 0)
        assert report[step] == {"applied": True, "changed": True, "finite": True, "skipped": 0}, step
    # NaN loss: no update reaches the weights, DeepSpeed counts the skip
    assert report["4"] == {"applied": False, "changed": False, "finite": True, "skipped": 1}
    assert report["5"] == {"applied": False, "changed": False, "finite": True, "skipped": 2}
    assert "Stopped at step 5" in report["error"] and "steps 4-5" in report["error"] and "CKPT" in report["error"]
    assert "trainer.max_nonfinite_steps=2" in report["error"]
