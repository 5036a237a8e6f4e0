"""The GPU suite's driver: install the carried wheels, run each case of bench/gpu_cases.py in its own process with a
timeout inside one time budget, and write the tables. bench/gpu_suite.sh is the command to use; docs/gpu.md explains
the cases, the budget and the output.

    bench/gpu_suite.sh [OUT_DIR] [--dry-run] [--cases full,lora] [--budget-s 480] [--timeout full=200]
                       [--set full.micro_batch=4] [--set steps=3]

Output (OUT_DIR, default $OUT, else outputs/gpu_suite): summary.md (the tables, also printed), results.jsonl (every
figure, one JSON object per line), log.txt (every run's full output), profiles.txt (torch.profiler tables).
Exit status 0 when every selected case ran to the end. Only the standard library is imported here: the wheels it
installs must not be imported before they are there.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_cases  # noqa: E402 -- stdlib-only at import time

DEFAULT_BUDGET_S = 480.0  # 8 minutes on the GPU machine, under its 10-minute limit per command
DRY_BUDGET_S = 1200.0
SUMMARY_RESERVE_S = 10.0  # kept back from the last case for the tables
KILL_GRACE_S = 5.0
GIB = 2**30
GOALS = {"full_mfu": 0.40, "lora_mfu": 0.45, "speedup": 1.1, "planner_error": 0.15, "generation_ratio": 1.0,
         "qlora_peak_gib": 14.0}  # QLoRA: GPT-J 6B on a 16 GB card (less the CUDA context and NCCL)


# --- wheels ----------------------------------------------------------------------------------------
def _version_key(version: str) -> tuple:
    try:
        from packaging.version import Version

        return (Version(version),)
    except Exception:  # noqa: BLE001 -- packaging missing or an odd version string: compare numerically
        return tuple(int(p) if p.isdigit() else 0 for p in version.replace("-", ".").split("."))


def wheels_to_install(wheels: list[Path], installed: Callable[[str], Optional[str]]) -> list[Path]:
    """The wheels whose distribution is not installed here, or only in an older version.

    A newer or equal installed version wins: what the machine ships was built and tested together.
    """
    chosen = []
    for wheel in sorted(wheels):
        name, version = wheel.name.split("-")[:2]
        have = installed(name.replace("_", "-").lower())
        if have is None or _version_key(have) < _version_key(version):
            chosen.append(wheel)
    return chosen


def installed_version(name: str) -> Optional[str]:
    import importlib.metadata as metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def install_wheels(wheel_dir: Path, site: Path, log) -> dict:
    """pip-install (no index, no dependencies) the needed wheels of `wheel_dir` into `site`, a --target directory
    put first on PYTHONPATH: the machine's Python is itself a venv, so a venv made from it with
    --system-site-packages would not see its torch."""
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    chosen = wheels_to_install(wheels, installed_version)
    info = {"wheel_dir": str(wheel_dir), "available": [w.name for w in wheels], "installed": [w.name for w in chosen],
            "site": str(site), "seconds": 0.0}
    if not chosen:
        return info
    t0 = time.monotonic()
    subprocess.run(["rm", "-rf", str(site)], check=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", str(site), *map(str, chosen)]
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    info["seconds"] = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(f"installing the wheels of {wheel_dir} failed (exit {proc.returncode}); see the log")
    return info


# --- processes -------------------------------------------------------------------------------------
_current: Optional[subprocess.Popen] = None


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (the run and anything it started), SIGKILL it after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(cmd: list[str], *, env: dict, timeout: float, log) -> tuple[str, float]:
    """Run `cmd` in its own process group with its output in `log`; ("ok" | "failed (exit N)" | "timeout", s)."""
    global _current
    start = time.monotonic()
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, **group)
    _current = proc
    try:
        code = proc.wait(timeout=max(timeout, 1.0))
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        stop_group(proc)
        status = "timeout"
    finally:
        _current = None
    return status, time.monotonic() - start


def torch_extensions_root() -> Path:
    """Where torch's JIT builds DeepSpeed's ops (cpu_adam, ...): TORCH_EXTENSIONS_DIR or torch's default cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def clear_build_locks(since: float) -> list[str]:
    """Remove the `lock` files of JIT builds that a killed run left (created after `since`). torch's FileBaton is a
    bare file: left behind, it makes every later build or load of that op wait for ever."""
    removed = []
    root = torch_extensions_root()
    for lock in root.glob("**/lock") if root.is_dir() else []:
        try:
            if lock.stat().st_mtime >= since - 1:
                lock.unlink()
                removed.append(str(lock))
        except OSError:
            pass
    return removed


def _on_signal(signum, _frame) -> None:
    # The suite itself is being stopped: take the running case (and its GPU memory) down with it.
    if _current is not None:
        stop_group(_current)
    raise SystemExit(128 + signum)


# --- the suite -------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def case_options(sets: list[str], case_names: list[str]) -> dict[str, dict]:
    """--set CASE.KEY=VALUE (one case) or KEY=VALUE (every case) -> {case: {key: value}}."""
    options: dict[str, dict] = {name: {} for name in case_names}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE or CASE.KEY=VALUE (e.g. full.micro_batch=4)")
        case, dot, name = key.partition(".")
        targets = [case] if dot else case_names
        if dot and case not in options:
            raise SystemExit(f"--set {item!r}: no case {case!r}; the cases are {', '.join(case_names)}")
        for target in targets:
            options[target][name if dot else key] = parse_value(value)
    return options


REQUIRED_MODULES = ("torch", "deepspeed", "transformers", "peft", "hydra", "omegaconf", "datasets")


def missing_modules(env: dict, modules: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
    """The modules the runs' Python cannot find (found, not imported: that would take torch's import time)."""
    code = ("import importlib.util, sys; "
            f"print(' '.join(m for m in {tuple(modules)!r} if importlib.util.find_spec(m) is None))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return out.stdout.split()


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="output folder (default: $OUT, else outputs/gpu_suite)")
    p.add_argument("--dry-run", action="store_true", help="the same cases on CPU at tiny shapes (no wheels installed)")
    p.add_argument("--cases", default=",".join(gpu_cases.CASES), help="comma-separated, in this order")
    p.add_argument("--budget-s", type=float, default=None, help=f"whole suite (default {DEFAULT_BUDGET_S:.0f} s)")
    p.add_argument("--timeout", action="append", default=[], metavar="CASE=S", help="a case's own cap, seconds")
    p.add_argument("--set", action="append", default=[], metavar="[CASE.]KEY=VALUE",
                   help="case options: micro_batch, checkpointing, steps, warmup, pin_memory, seq_len, ...")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheels to install first (bench/gpu_wheels.sh)")
    p.add_argument("--site", default=None, help="where they are installed (default: a folder under $TMPDIR)")
    p.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)  # the shell's start time
    args = p.parse_args(argv)

    started = args.started or time.time()
    budget = args.budget_s or (DRY_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S)
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in gpu_cases.CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; the cases are {', '.join(gpu_cases.CASES)}")
    caps = {}
    for item in args.timeout:
        case, _, seconds = item.partition("=")
        if case not in gpu_cases.CASES:
            p.error(f"--timeout {item!r}: no case {case!r}")
        caps[case] = float(seconds)
    options = case_options(args.set, list(gpu_cases.CASES))

    def cap_of(name: str) -> float:
        case = gpu_cases.CASES[name]
        return caps.get(name, case.dry_timeout_s if args.dry_run else case.timeout_s)

    out = Path(args.out or os.environ.get("OUT") or ROOT / "outputs" / "gpu_suite")
    out.mkdir(parents=True, exist_ok=True)
    for path in (out / "results.jsonl", out / "profiles.txt", out / "log.txt", out / "summary.md"):
        path.unlink(missing_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        return run_suite(args, out=out, names=names, options=options, cap_of=cap_of, started=started,
                         budget=budget)
    finally:  # also when the suite itself is stopped: the tables of what ran
        write_summary(out, args.dry_run)


def run_suite(args: argparse.Namespace, *, out: Path, names: list[str], options: dict[str, dict],
              cap_of: Callable[[str], float], started: float, budget: float) -> int:
    """Install, then run the cases within the budget; the exit status (0: every run ended normally)."""
    deadline = started + budget
    results, profiles, log_path = out / "results.jsonl", out / "profiles.txt", out / "log.txt"

    def record(row: dict) -> None:
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    paths = [str(ROOT)]
    with open(log_path, "a", buffering=1) as log:
        if args.dry_run:
            env["DS_ACCELERATOR"] = "cpu"
            install = {"skipped": "dry run: the current environment is used"}
        else:
            site = Path(args.site or Path(os.environ.get("TMPDIR", "/tmp")) / "gpu_suite_site")
            install = install_wheels(Path(args.wheels), site, log)
            if install["installed"]:
                paths.append(str(site))
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        missing = missing_modules(env)
        if missing:
            print(f"[suite] {', '.join(missing)} cannot be imported here, and {args.wheels} holds no wheel for it: "
                  "run bench/gpu_wheels.sh where pip reaches an index and bring .whl/ along (docs/gpu.md).", flush=True)
            return 2
        record({"kind": "suite", "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
                "dry_run": args.dry_run, "budget_s": budget, "cases": names, "commit": git_commit(),
                "install": install, "options": {n: options[n] for n in names if options[n]}})
        plan = ", ".join(f"{n} <= {cap_of(n):.0f} s" for n in names)
        print(f"[suite] {'dry run, ' if args.dry_run else ''}budget {budget:.0f} s ({deadline - time.time():.0f} s "
              f"left): {plan}; output in {out}", flush=True)

        all_ok = True
        for name in names:
            case = gpu_cases.CASES[name]
            cap = cap_of(name)
            allowed = min(cap, deadline - SUMMARY_RESERVE_S - time.time())
            if allowed < min(case.min_s, cap):
                record({"case": name, "run": "-", "kind": "status", "status": "skipped",
                        "note": f"{allowed:.0f} s left of the budget, the case needs {case.min_s:.0f} s"})
                print(f"[suite] {name}: skipped, {max(allowed, 0):.0f} s left", flush=True)
                all_ok = False
                continue
            case_deadline = time.time() + allowed
            for i, run in enumerate(case.runs):
                # Runs share the case's time equally; what one leaves unused goes to the next.
                timeout = (case_deadline - time.time()) / (len(case.runs) - i)
                cmd = [sys.executable, str(ROOT / "bench" / "gpu_cases.py"), run.name, "--case", name,
                       "--results", str(results), "--profiles", str(profiles),
                       "--deadline", str(time.time() + timeout),
                       "--options", json.dumps({**case.options, **options[name]})]
                if args.dry_run:
                    cmd.append("--dry-run")
                log.write(f"\n===== {name}/{run.name} (timeout {timeout:.0f} s) =====\n")
                offset = log.tell()
                run_started = time.time()
                status, seconds = run_process(cmd, env=env, timeout=timeout, log=log)
                row = {"case": name, "run": run.name, "kind": "status", "status": status, "seconds": seconds}
                if status == "timeout":
                    removed = clear_build_locks(run_started)
                    if removed:
                        row["note"] = f"killed inside a JIT build; removed its lock {', '.join(removed)}"
                record(row)
                print(f"[suite] {name}/{run.name}: {status} in {seconds:.0f} s", flush=True)
                if status != "ok":
                    all_ok = False
                    log.flush()
                    with open(log_path, errors="replace") as f:
                        f.seek(offset)
                        tail = [line for line in f.read().splitlines() if line.strip()][-15:] or ["(no output)"]
                    print("\n".join(f"    {line[:300]}" for line in tail), flush=True)
    return 0 if all_ok else 1


def write_summary(out: Path, dry: bool) -> None:
    summary = summarize(load_rows(out / "results.jsonl"), dry=dry)
    (out / "summary.md").write_text(summary + "\n")
    print(summary, flush=True)


# --- tables ----------------------------------------------------------------------------------------
def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value: Any, spec: str = ".3g", none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _pct(value: Optional[float], signed: bool = False) -> str:
    return "n/a" if value is None else format(value, "+.1%" if signed else ".1%")


def _gib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / GIB:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def summarize(rows: list[dict], *, dry: bool) -> str:
    """Markdown: the run, every case's status, then training, heads, generation and parity tables and the goals."""
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    suite = (by_kind.get("suite") or [{}])[0]
    env = (by_kind.get("environment") or [{}])[0]
    gpu = env.get("gpu") or {}
    versions = env.get("versions") or {}
    lines = [f"# GPU suite{' (dry run: CPU, tiny shapes; the numbers mean nothing)' if dry else ''}", ""]
    if not env:
        lines.append(f"{suite.get('started', '?')}, commit {suite.get('commit') or '?'}; the setup case did not run: "
                     "no versions or card recorded.")
    else:
        card = gpu.get("name", "CPU") + (f" ({gpu['memory_gib']:.0f} GiB, CUDA {gpu.get('cuda')})" if gpu else "")
        lines.append(
            f"{suite.get('started', '?')}, commit {suite.get('commit') or '?'}; {card}; torch {versions.get('torch')}, "
            f"deepspeed {versions.get('deepspeed')}, transformers {versions.get('transformers')}, peft "
            f"{versions.get('peft')}; measured {env.get('matmul_dtype', '')} matmul "
            f"{_fmt(env.get('matmul_tflops'), '.0f')} TFLOP/s ({env.get('matmul_size', '?')}^3); MFU is against "
            f"{gpu_cases.PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s."
        )
    lines += ["", "## Cases", ""]
    lines += _table(["case", "run", "status", "seconds", "note"],
                    [[r["case"], r["run"], r["status"], _fmt(r.get("seconds"), ".0f", ""), r.get("note", "")]
                     for r in by_kind.get("status", [])])

    training = by_kind.get("training", [])
    if training:
        reference = {r["case"]: r for r in training if r["run"] == "transformers"}
        table = []
        for r in training:
            ref = reference.get(r["case"])
            ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref and r is not ref else None
            table.append([
                r["case"], r["run"], f"ZeRO-{r['zero_stage']}" + (" + CPU Adam" if r["offload"] else ""),
                f"{r['micro_batch']} x {r['seq_len']}", _fmt(r["checkpointing"]), _fmt(r["step_s"], ".3f"),
                _fmt(r["tokens_per_s"], ".0f"), _fmt(ratio, ".2f", "-"), _pct(r.get("mfu")),
                _gib(r.get("peak_bytes")), _gib(r.get("estimate_bytes")), _pct(r.get("estimate_error"), signed=True),
                _fmt(r.get("init_s"), ".0f"),
            ])
        lines += ["", "## Training (median step after warmup)", ""]
        lines += _table(["case", "run", "DeepSpeed", "micro batch x seq", "act. ckpt", "s/step", "tokens/s",
                         "x transformers", "MFU", "peak GiB", "planner GiB", "planner error", "init s"], table)
        notes = [f"- {r['case']}/{r['run']}: {note}" for r in training for note in r.get("notes", [])]
        notes += [f"- {r['case']}/{r['run']}: DeepSpeedCPUAdam JIT build (or cache load) {r['cpu_adam_build_s']:.0f} s"
                  f", host buffers {'pinned' if r.get('pin_memory') else 'not pinned'}"
                  for r in training if r.get("cpu_adam_build_s") is not None]
        if notes:
            lines += [""] + notes

    heads = by_kind.get("heads", [])
    if heads:
        lines += ["", "## Task heads (one LoRA step each; the head trained in full)", ""]
        lines += _table(["task", "DeepSpeed config", "micro batch x seq", "loss", "head trained", "s/step", "peak GiB"],
                        [[r["task"], r["config"], f"{r['micro_batch']} x {r['seq_len']}", _fmt(r["losses"][-1], ".4f"),
                          _fmt(r.get("watched_changed")), _fmt(r["step_s"], ".3f"), _gib(r.get("peak_bytes"))]
                         for r in heads])

    generation = by_kind.get("generation", [])
    if generation:
        greedy = {r["batch"]: r for r in by_kind.get("greedy", [])}
        table = []
        for batch in sorted({r["batch"] for r in generation}):
            ours = next((r for r in generation if r["batch"] == batch and r["impl"] == "ours"), None)
            hf = next((r for r in generation if r["batch"] == batch and r["impl"] == "transformers"), None)
            g = greedy.get(batch, {})
            table.append([
                str(batch), f"{(ours or hf)['prompt_len']} + {(ours or hf)['new_tokens']}",
                _fmt(ours and ours["tokens_per_s"], ".0f"), _fmt(hf and hf["tokens_per_s"], ".0f"),
                _fmt(ours["tokens_per_s"] / hf["tokens_per_s"] if ours and hf else None, ".2f"),
                f"{g['rows_equal']}/{g['rows']}" if g else "n/a", _pct(g.get("token_agreement")),
                _fmt(g.get("first_divergence"), "d", "-"),
            ])
        lines += ["", "## Generation (greedy, KV cache; new tokens/s, prefill included)", ""]
        lines += _table(["batch", "prompt + new", "ours tok/s", "transformers tok/s", "x transformers",
                         "rows equal", "tokens equal", "first divergence"], table)

    parity = by_kind.get("parity", [])
    full = {r["run"]: r for r in training if r["case"] == "full"}
    if parity or len(full) == 2:
        lines += ["", "## Parity, ours vs transformers on the same weights and input", ""]
        table = []
        for r in parity:
            table += [
                [f"logits, {r['dtype']}, 1 x {r['tokens']} tokens: max abs diff", _fmt(r["max_abs_diff"], ".3g")],
                ["logits: mean abs diff", _fmt(r["mean_abs_diff"], ".3g")],
                ["ours vs fp32 reference: max abs diff", _fmt(r["ours_vs_fp32_max"], ".3g")],
                ["transformers vs fp32 reference: max abs diff", _fmt(r["transformers_vs_fp32_max"], ".3g")],
                ["argmax agreement over positions", _pct(r["argmax_agreement"])],
            ]
        if len(full) == 2:
            ours, hf = full["ours"]["losses"], full["transformers"]["losses"]
            for step in range(min(2, len(ours), len(hf))):
                when = "before any update" if step == 0 else "after one update"
                table.append([f"training loss, step {step + 1} ({when}): ours / transformers",
                              f"{ours[step]:.5f} / {hf[step]:.5f} (diff {ours[step] - hf[step]:+.2e})"])
        lines += _table(["quantity", "value"], table)

    lines += ["", "## Goals", ""]
    if dry:
        lines.append("Not evaluated in a dry run.")
    else:
        lines += _table(["goal", "measured", "met"], goals(training, generation))
    return "\n".join(lines)


def goals(training: list[dict], generation: list[dict]) -> list[list[str]]:
    """The issue's targets against the measured rows: [goal, measured, met]."""
    out = []

    def row(goal: str, value: Optional[float], target: float, shown: str, higher: bool = True) -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        out.append([goal, shown, _fmt(met)])

    by = {(r["case"], r["run"]): r for r in training}
    for case, key in (("full", "full_mfu"), ("lora", "lora_mfu")):
        r = by.get((case, "ours"))
        row(f"{case}: MFU >= {GOALS[key]:.0%}", r and r.get("mfu"), GOALS[key], _pct(r and r.get("mfu")))
        hf = by.get((case, "transformers"))
        ratio = r["tokens_per_s"] / hf["tokens_per_s"] if r and hf else None
        row(f"{case}: tokens/s >= {GOALS['speedup']}x transformers'", ratio, GOALS["speedup"], _fmt(ratio, ".2f"))
    qlora = by.get(("qlora", "ours"))
    peak = qlora and qlora.get("peak_bytes")
    row(f"qlora: peak <= {GOALS['qlora_peak_gib']:.0f} GiB (a 16 GB GPU)", peak and peak / GIB, GOALS["qlora_peak_gib"],
        _gib(peak), higher=False)
    for (case, run), r in by.items():
        if run == "ours":
            error = r.get("estimate_error")
            row(f"{case}: planner within {GOALS['planner_error']:.0%} of the measured peak",
                None if error is None else abs(error), GOALS["planner_error"], _pct(error, signed=True), higher=False)
    for batch in sorted({r["batch"] for r in generation}):
        ours = next((r for r in generation if r["batch"] == batch and r["impl"] == "ours"), None)
        hf = next((r for r in generation if r["batch"] == batch and r["impl"] == "transformers"), None)
        ratio = ours["tokens_per_s"] / hf["tokens_per_s"] if ours and hf else None
        row(f"generation, batch {batch}: tokens/s >= transformers'", ratio, GOALS["generation_ratio"],
            _fmt(ratio, ".2f"))
    return out


if __name__ == "__main__":
    sys.exit(main())
