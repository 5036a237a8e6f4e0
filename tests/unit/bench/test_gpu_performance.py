"""bench/gpu_performance.py's fused-projection and compile cases, run as --dry-run (CPU, tiny shapes) in-process,
so the GPU cases cannot rot between GPU runs."""
import gpu_performance
import pytest


def test_case_option_takes_a_list_and_refuses_unknown_cases():
    assert gpu_performance.parse_args(["--case", "fused,compile"]).cases == ["fused", "compile"]
    assert gpu_performance.parse_args([]).cases == list(gpu_performance.CASES)
    with pytest.raises(SystemExit):
        gpu_performance.parse_args(["--case", "fused,turbo"])


def test_fused_and_compile_cases_dry_run(tmp_path):
    args = gpu_performance.parse_args(["--case", "fused,compile", "--dry-run", "--json", str(tmp_path / "r.json")])
    args.seq_len = 16  # the smallest step that still has two lengths (16 and 8)
    gpu_performance.main(args)
    fused, compiled = __import__("json").loads((tmp_path / "r.json").read_text())
    assert fused["case"] == "fused" and fused["rows"]["unfused"]["loss"] > 0
    if gpu_performance.supports_fused_projections():
        # One product over concatenated weights sums each output over the same inputs: fp32 rounding apart, equal.
        assert fused["loss_rel_diff"] < 1e-5 and max(fused["grad_rel_diff"].values()) < 1e-4
    else:
        assert set(fused["rows"]) == {"unfused"} and "no fused_projections" in fused["note"]
    # The eager backend replays the captured operations: the same arithmetic in the same order.
    assert compiled["backend"] == "eager" and compiled["loss_rel_diff"] == 0.0
    assert set(compiled["rows"]) == {"eager", "compiled"} and compiled["rows"]["compiled"]["first_step_s"] > 0
