"""Several training runs in one process group, one after another: `python train_worker.py jobs.json` on every rank
(the `run_ranks` fixture starts them), so that a test with many small runs pays for one start of its ranks.

jobs.json: {"runs": [{"run_dir": ..., "overrides": [...]}, ...], "results": path}. Each run is composed from
conf/train.yaml with its overrides and trained by `finetune.runner.run`, the function behind launch/train.py. A
user error (ConfigError and the like) is recorded as that run's result, with the rank's output, and the next run
goes on; rank 0 writes every result to `results`.

The helpers below are for the tests that use it (tests/integration/test_layout_invariance.py,
test_elastic_resume.py), with the tolerances of their comparisons.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def run_jobs(run_ranks, workdir: Path, runs: list[dict], *, world: int, timeout: float = 1800,
             env: dict[str, str] | None = None) -> list[dict]:
    """Train `runs` ({"run_dir", "overrides"}) on `world` CPU ranks in one process group (with `env`'s variables);
    their results in order."""
    workdir.mkdir(parents=True, exist_ok=True)
    jobs, results = workdir / f"jobs_{len(list(workdir.glob('jobs_*')))}.json", workdir / "results.json"
    results.unlink(missing_ok=True)
    jobs.write_text(json.dumps({"runs": runs, "results": str(results)}))
    run_ranks(Path(__file__), str(jobs), world=world, timeout=timeout, env=env)
    return json.loads(results.read_text())


def instruction_data(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """Prompt/response rows whose responses have very different lengths (1 to 60 words), as JSON lines."""
    import random

    rng = random.Random(seed)
    words = "the a model river stone quick blue runs under over seven light paper window".split()
    with open(path, "w") as handle:
        for i in range(rows):
            prompt = f"Question {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) + "?\n"
            response = " ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 5, 30, 60])))
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    """The logged train loss of each step (the last record wins when a resumed run logs a step again)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {key: value for path in sorted((Path(run_dir) / "final").glob("*.safetensors"))
            for key, value in load_file(path).items()}


# The comparisons below say what fp32 arithmetic formed in another order can move, and nothing more: the order of
# a sum changes with the layout (per micro batch, then across ranks) and with the CPU (torch's and MKL's kernels
# for AVX2, AVX-512 or AMX block their sums differently). docs/testing.md says how to try other CPUs' orders here.
FP32_UNIT_ROUNDOFF = 2.0 ** -24
# Another CPU's order of sums, on this one: torch's portable kernels instead of its AVX2/AVX-512 ones, and MKL's
# conditional-numerical-reproducibility path instead of the one it picks for this CPU.
OTHER_CPU_ARITHMETIC = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}

# A logged loss is the mean of a step's per-target losses (at most 512 targets in these tests: 4 rows of up to 128
# tokens). Summing n positive terms in another order moves the sum by at most (n - 1) u relative (Higham,
# "Accuracy and Stability of Numerical Algorithms", 4.2); the per-target losses themselves agree far closer (a step's
# loss moved by at most 1.3e-7 between layouts on AVX2, AVX-512 and torch's default kernels). The per-micro-batch
# mean, the bug the layout test exists for, moves it by 1e-3 to 1e-2.
LOSS_RTOL = 512 * FP32_UNIT_ROUNDOFF  # 3.05e-5

# An element of a weight whose gradient is far above its rounding error takes the same Adam steps up to rounding:
# a sum of n <= 512 rows has a relative error of at most n u = 3e-5 times its condition number (the sum of the
# terms' sizes over the size of their sum), so ELEMENT_RTOL admits condition numbers up to about 30.
ELEMENT_RTOL = 1e-3
# ...and the few elements whose gradient cancels to about its rounding error (see weight_disagreements) may be
# anywhere within Adam's bound: at most this fraction of a tensor, and at least one element of every tensor.
ILL_CONDITIONED_FRACTION = 0.01


def adam_step_bound(beta1: float, beta2: float, steps: int) -> float:
    """The most |m_hat / sqrt(v_hat)| (Adam's step over lr) can be in the first `steps` steps, for any gradients.

    m_hat and v_hat are weighted sums of g_k and g_k^2 with weights a_k and b_k; by Cauchy-Schwarz
    |m_hat| <= sqrt(v_hat) * sqrt(sum a_k^2 / b_k). 1.0 at step 1, 1.17 at most for (0.9, 0.95).
    """
    def at(t: int) -> float:
        a = [(1 - beta1) * beta1 ** (t - k) / (1 - beta1 ** t) for k in range(1, t + 1)]
        b = [(1 - beta2) * beta2 ** (t - k) / (1 - beta2 ** t) for k in range(1, t + 1)]
        return sum(x * x / y for x, y in zip(a, b)) ** 0.5

    return max(at(t) for t in range(1, steps + 1))


def weight_disagreements(weights: dict, reference: dict, *, lrs: dict[int, float], betas=(0.9, 0.95),
                         weight_decay: float = 0.0, free=()) -> list[str]:
    """How the final weights of two runs of the same training differ beyond what fp32 reordering explains; [] if not.

    Adam's step for an element is lr * m_hat / (sqrt(v_hat) + eps): it follows the sign and history of the
    element's gradient, not its size. Where a gradient cancels to about its own rounding error, the order of the
    sums (the layout, the CPU's kernels) decides part or all of that element's steps, up to a whole step either
    way. It happens to a few elements (1 to 5 of 16384 in the layout test, different ones on AVX2 and AVX-512),
    so no bound on a whole tensor's norm both admits them and catches a real difference. Element by element:
    - every element within Adam's own bound: two runs that each moved it by at most sum(lr) * adam_step_bound
      (plus weight decay) cannot differ by more than twice that;
    - all but ILL_CONDITIONED_FRACTION of each tensor's elements (at least one may stray) within
      ELEMENT_RTOL * sum(lr), the rounding of an element whose gradient is well above its rounding error.
    A bug in how a layout forms the gradient moves whole tensors: the per-micro-batch mean changes every element
    (test_layout_invariance.py checks that this comparison rejects it), and so would a missing all-reduce.
    `lrs`: the learning rate of each step in which the runs may differ, by step (metrics.jsonl logs it).
    `free`: tensors whose gradient is zero up to rounding (biases the loss cannot see), held to Adam's bound only.
    """
    assert sorted(weights) == sorted(reference), "the runs hold different tensors"
    lr_sum = sum(lrs.values())
    problems = []
    for name, ref in reference.items():
        ref = ref.double()
        diff = (weights[name].double() - ref).abs()
        step_bound = 2 * lr_sum * (adam_step_bound(*betas, max(lrs)) + weight_decay * float(ref.abs().max()))
        if float(diff.max()) > step_bound:
            problems.append(f"{name}: an element differs by {float(diff.max()):.3g}, more than Adam's steps can "
                            f"move it ({step_bound:.3g})")
            continue
        if name in free:
            continue
        strays = int((diff > ELEMENT_RTOL * lr_sum).sum())
        allowed = max(1, int(ILL_CONDITIONED_FRACTION * diff.numel()))
        if strays > allowed:
            problems.append(f"{name}: {strays} of {diff.numel()} elements differ by more than {ELEMENT_RTOL} of "
                            f"the steps' size ({ELEMENT_RTOL * lr_sum:.3g}); rounding explains at most {allowed}")
    return problems


def train_lrs(run_dir: Path) -> dict[int, float]:
    """The logged learning rate of each step: the rate the step used."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["lr"] for row in rows if row["split"] == "train"}


def main(jobs_file: str) -> None:
    from hydra import compose, initialize_config_dir

    from finetune import distributed, runner
    from finetune.cli import is_user_error

    jobs = json.loads(Path(jobs_file).read_text())
    runner.register_resolvers()
    results = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        for job in jobs["runs"]:
            cfg = compose("train", overrides=["logger=none", *job["overrides"]])
            output = io.StringIO()
            try:
                with contextlib.redirect_stdout(output):
                    runner.run(cfg, run_dir=Path(job["run_dir"]))
                results.append({"ok": True, "run_dir": job["run_dir"], "output": output.getvalue()})
            except Exception as err:  # noqa: BLE001 - a user error is a result; anything else fails the test
                if not is_user_error(err):
                    raise
                results.append({"ok": False, "run_dir": job["run_dir"], "error": str(err), "type": type(err).__name__,
                                "output": output.getvalue()})
            print(output.getvalue(), flush=True)
    info = distributed.init_distributed()
    if info.is_main:
        Path(jobs["results"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
