"""Out of core: a GPT-J-width model whose model states exceed host RAM trains with ZeRO-3, parameters and optimizer
states on NVMe (deepspeed=zero3_nvme), on 2 CPU ranks of this machine.

GPT-J 6B's layer shapes (width 4096, 16 heads, rotary 64, vocab 50400), with as many layers as make the model
states (bf16 weights + fp32 master weights + two fp32 Adam moments: 16 bytes per parameter) at least --min-ratio x
the host RAM, while the input checkpoint, the swap files, two checkpoints (the old one is deleted only once the new
one is complete) and final/ fit on the work dir's disk. The script

  1. writes a random HF-format checkpoint of that shape, one safetensors shard at a time (never whole in RAM);
  2. launches `deepspeed --num_gpus 2 launch/train.py task=clm model.path=<it> deepspeed=zero3_nvme ...` (bf16,
     activation checkpointing; one example of the bundled data: at the default --seq-len 16 it makes 2 rows, one
     global batch, the same at every step), which trains --steps optimizer steps and checkpoints;
  3. relaunches the run dir: it resumes, trains one more step, checkpoints and exports final/;
  4. exports the last checkpoint again with launch/export.py (DeepSpeed's lazy consolidation);
  5. reports, from samples of every process of each launch (/proc, every --sample-s): the node's peak RSS
     against the RAM, bytes on NVMe against the memory planner's estimate, the planner's host memory against
     the node's peak anonymous memory, seconds per step and where they go (CPU time vs waiting, and the swap
     traffic at the disk's O_DIRECT bandwidth measured here), export peak RSS against the exported size, and
     the losses;
  6. removes what it wrote (model, run dir, swap, export) unless --keep, leaving report.json and the logs.

    python bench/out_of_core.py --work-dir /mnt/nvme/ooc                  # sized for this machine
    python bench/out_of_core.py --work-dir /tmp/ooc --ram-gb 3            # the whole flow in minutes: 1 layer
    python bench/out_of_core.py --work-dir /tmp/ooc --ram-gb 3 --reference   # + the same steps with CPU offload

--ram-gb sizes the model for a smaller RAM (the checks use it too). With --limit-memory the launches run in a
memory cgroup (v1 or v2; needs root or a delegated cgroup) limited to --ram-gb, so that RAM is enforced by the
kernel: page cache is reclaimed at the limit, and memory the run cannot give back gets it killed (reported as an
OOM kill). Without it, the real RAM must still hold the run.

    python bench/out_of_core.py --work-dir /work/ooc --ram-gb 18.55 --limit-memory   # 6 layers: 1.30x the limit

--width W (a multiple of 16, default 4096) narrows the layers for a quick check of the flow on a slow disk: one
layer at GPT-J width is already 0.61B parameters (the embedding and lm_head are 0.41B of them).
--reference also trains the same steps with zero3_offload (states in RAM: only where they fit) for the
slowdown ratio NVMe / CPU offload. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GiB = 2**30
WIDTH, HEADS, VOCAB = 4096, 16, 50400  # WIDTH: --width
WORLD = 2
DISK_MARGIN = 1.05  # files the estimate leaves out (tokenizer, logs, metadata) and file system overhead


# --- sizing -----------------------------------------------------------------------------------------
def model_shape(layers: int):
    from finetune.planning.estimate import ModelShape

    return ModelShape(n_layer=layers, n_embd=WIDTH, n_head=HEADS, vocab_size=VOCAB, head="clm")


def run_shape(seq_len: int):
    from finetune.planning.estimate import RunShape

    return RunShape(micro_batch_size=1, seq_len=seq_len, precision="bf16", activation_checkpointing=True)


def planner_estimate(layers: int, seq_len: int, config: str = "zero3_nvme"):
    """The planner's estimate of the run on this node: 2 ranks of DeepSpeed's CPU accelerator."""
    from finetune.planning.choice import option_of
    from finetune.planning.estimate import Cluster, estimate, zero_buffers_from_ds_config

    ds = json.loads((ROOT / "ds_configs" / f"{config}.json").read_text())
    cluster = Cluster(gpus_per_node=WORLD, accelerator="cpu", nvme_gb=1e6)
    return estimate(model_shape(layers), run_shape(seq_len), cluster, option_of(ds),
                    buffers=zero_buffers_from_ds_config(ds))


def parameters(layers: int) -> int:
    from finetune.planning.estimate import count_parameters

    return count_parameters(model_shape(layers))


def disk_need(layers: int, seq_len: int) -> dict[str, int]:
    """Bytes on the work dir's disk at the busiest moment: the end of the resumed launch."""
    P = parameters(layers)
    return {
        "input checkpoint (bf16)": 2 * P,
        "NVMe swap (planner)": planner_estimate(layers, seq_len).nvme_bytes,
        # DeepSpeed copies each rank's swapped fp32 master weights and moments into the checkpoint (12 bytes per
        # parameter); the previous checkpoint is deleted only after the new one is complete.
        "two checkpoints": 2 * 12 * P,
        "final/ (bf16)": 2 * P,
    }


def choose_layers(ram: int, free_disk: int, *, min_ratio: float, seq_len: int, layers: Optional[int]) -> int:
    if layers is None:
        layers = 1
        while 16 * parameters(layers) < min_ratio * ram:
            layers += 1
    need = sum(disk_need(layers, seq_len).values()) * DISK_MARGIN
    P = parameters(layers)
    if need > free_disk:
        raise SystemExit(
            f"{layers} layers ({P / 1e9:.2f}B parameters, model states {16 * P / GiB:.1f}"
            f" GiB = {16 * P / ram:.2f}x the {ram / GiB:.1f} GiB of RAM) need about {need / GiB:.0f} "
            f"GiB of disk ({', '.join(f'{k} {v / GiB:.1f}' for k, v in disk_need(layers, seq_len).items())}), but "
            f"the work dir's disk has {free_disk / GiB:.0f} GiB free. Free space, use a larger disk, or pass "
            "--ram-gb / --layers for a smaller run."
        )
    return layers


# --- the disk's own speed ---------------------------------------------------------------------------
def disk_bandwidth(directory: Path, size: int = GiB, block: int = 2**20) -> dict[str, float]:
    """Sequential O_DIRECT write then read of `size` bytes in `block`s (what DeepSpeed's async I/O does), GB/s."""
    path = directory / ".bandwidth_probe"
    buffer = mmap.mmap(-1, block)
    buffer.write(os.urandom(block))
    result = {}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        start = time.perf_counter()
        for _ in range(size // block):
            os.write(fd, buffer)
        os.fsync(fd)
        os.close(fd)
        result["write_GBps"] = size / (time.perf_counter() - start) / 1e9
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        start = time.perf_counter()
        while os.readv(fd, [buffer]):
            pass
        os.close(fd)
        result["read_GBps"] = size / (time.perf_counter() - start) / 1e9
    finally:
        path.unlink(missing_ok=True)
    return result


# --- watching a launch ------------------------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _io_and_cpu(pid: int) -> tuple[int, int, float]:
    io = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            io[key] = int(value)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return io.get("read_bytes", 0), io.get("write_bytes", 0), cpu


@dataclass
class Sample:
    t: float
    rss: int  # every process of the launch
    anon: int  # their anonymous + shared memory (the launchers' included: what the planner's host line counts)
    ranks_rss: int  # the training processes only
    ranks_anon: int  # their anonymous + shared memory (what must fit; file pages can be dropped)
    nvme: int  # bytes under the swap directory
    read: int  # cumulative storage bytes of the ranks (exited ones keep their last count)
    written: int
    cpu: float  # cumulative CPU seconds of the ranks


@dataclass
class Watched:
    returncode: int
    samples: list[Sample]
    marks: dict[str, float]  # output pattern -> first time seen
    output: str
    seconds: float
    last_io: dict[int, tuple[int, int, float]] = field(default_factory=dict)

    def peak(self, attr: str, start: float = 0.0, end: float = math.inf) -> int:
        return max((getattr(s, attr) for s in self.samples if start <= s.t <= end), default=0)

    def at(self, t: float) -> Sample:
        return min(self.samples, key=lambda s: abs(s.t - t))


def watch(cmd: list[str], *, env: dict, log: Path, swap_root: Optional[Path], sample_s: float,
          marks: dict[str, str], timeout: float, cgroup: Optional["MemoryCgroup"] = None) -> Watched:
    """Run `cmd`, sampling memory, I/O and CPU of its process tree; `marks`: name -> regex seen in its output."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=cgroup.join if cgroup is not None else None)
    seen: dict[str, float] = {}
    chunks: list[str] = []

    def read_output() -> None:
        with open(log, "w") as out:
            tail = ""
            while True:
                data = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536)
                if not data:
                    return
                text = data.decode(errors="replace")
                out.write(text)
                out.flush()
                chunks.append(text)
                tail = (tail + text)[-4096:]
                now = time.perf_counter() - start
                for name, pattern in marks.items():
                    if name not in seen and re.search(pattern, tail):
                        seen[name] = now

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    samples: list[Sample] = []
    last_io: dict[int, tuple[int, int, float]] = {}
    root = psutil.Process(proc.pid)
    next_du = 0.0
    nvme = 0
    while proc.poll() is None:
        now = time.perf_counter() - start
        if now > timeout:
            proc.kill()
            break
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = anon = ranks_rss = ranks_anon = 0
        for p in family:
            try:
                status = _status(p.pid)
                rss += status.get("VmRSS", 0)
                anon += status.get("RssAnon", 0) + status.get("RssShmem", 0)
                if "launch/train.py" in " ".join(p.cmdline()) and "--local_rank" in " ".join(p.cmdline()) or \
                        "launch/export.py" in " ".join(p.cmdline()):
                    ranks_rss += status.get("VmRSS", 0)
                    ranks_anon += status.get("RssAnon", 0) + status.get("RssShmem", 0)
                    last_io[p.pid] = _io_and_cpu(p.pid)
            except (OSError, psutil.Error):
                continue
        if swap_root is not None and now >= next_du:
            nvme = sum(f.stat().st_size for f in swap_root.rglob("*") if f.is_file()) if swap_root.exists() else 0
            next_du = now + 2.0
        read, written, cpu = (sum(v[i] for v in last_io.values()) for i in range(3))
        samples.append(Sample(now, rss, anon, ranks_rss, ranks_anon, nvme, read, written, cpu))
        time.sleep(sample_s)
    proc.wait()
    reader.join(timeout=10)
    return Watched(proc.returncode, samples, seen, "".join(chunks), time.perf_counter() - start, last_io)


# --- an enforced memory limit ------------------------------------------------------------------------
@dataclass
class MemoryCgroup:
    """A memory cgroup limited to `limit` bytes that the launches join (cgroup v2, or v1's memory controller)."""

    path: Path
    version: int

    @classmethod
    def create(cls, limit: int) -> "MemoryCgroup":
        name = f"finetune-out-of-core-{os.getpid()}"
        v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        try:
            if (v2 / "cgroup.controllers").exists():
                group = cls(v2 / name, 2)
                group.path.mkdir()
                (group.path / "memory.max").write_text(str(limit))
                if (group.path / "memory.swap.max").exists():
                    (group.path / "memory.swap.max").write_text("0")
            else:
                group = cls(v1 / name, 1)
                group.path.mkdir()
                (group.path / "memory.limit_in_bytes").write_text(str(limit))
                if (group.path / "memory.memsw.limit_in_bytes").exists():
                    (group.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError as err:
            raise SystemExit(f"--limit-memory: cannot create a memory cgroup ({err}); run as root, or in a "
                             "cgroup whose memory controller is delegated to you, or drop --limit-memory.")
        return group

    def join(self) -> None:
        """Move the calling process into the group (a Popen preexec_fn: its children inherit it)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> Optional[int]:
        """The group's peak charge so far (page cache included); None where the kernel does not keep one."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int((self.path / name).read_text()) if (self.path / name).exists() else None

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        lines = (self.path / name).read_text().split("\n") if (self.path / name).exists() else []
        return sum(int(line.split()[1]) for line in lines if line.startswith("oom_kill "))

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


# --- the run ----------------------------------------------------------------------------------------
def train_command(run_dir: Path, model_dir: Path, nvme: Path, *, seq_len: int, steps: int, lr: float,
                  config: str, stop: bool) -> list[str]:
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "deepspeed"), "--num_gpus", str(WORLD), str(ROOT / "launch" / "train.py"),
           f"hydra.run.dir={run_dir}", "logger=none", "task=clm", "model=gptj-6b", f"model.path={model_dir}",
           "model.dtype=bf16", "model.gradient_checkpointing=true", "trainer.precision=bf16",
           f"data.max_seq_len={seq_len}", "trainer.micro_batch_size=1", f"trainer.max_steps={steps + 1}",
           f"trainer.save_every={steps}", "trainer.keep_last=1", "trainer.log_every=1", "trainer.eval_every=0",
           "trainer.eval_at_end=false", f"optim.lr={lr}", "scheduler=constant", "scheduler.warmup_steps=1",
           # One example (2 rows at --seq-len 16): the global batch is the same at every step, so the loss falls if and
           # only if the optimizer steps through NVMe work; between different batches of 16 random-model tokens the
           # loss varies more than 3 steps change it.
           "data.max_train_samples=1", f"deepspeed={config}"]
    if config == "zero3_nvme":
        cmd.append(f"deepspeed.nvme_path={nvme}")
    if stop:
        cmd.append(f"trainer.stop_after_steps={steps}")
    return cmd


def environment() -> dict:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("MASTER_PORT", None)
    return env


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def step_times(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["step_time"] for r in rows if r["split"] == "train" and "step_time" in r}


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file()) if path.exists() else 0


def phase_stats(w: Watched, steps_in_launch: int) -> dict:
    """Per-step I/O and CPU of the training window: from the "training starts" mark to the progress bar's end."""
    start, end = w.marks.get("train"), w.marks.get("steps done")
    if start is None or end is None or end <= start:
        return {}
    a, b = w.at(start), w.at(end)
    return {
        "window_s": b.t - a.t,
        "read_bytes_per_step": (b.read - a.read) / steps_in_launch,
        "written_bytes_per_step": (b.written - a.written) / steps_in_launch,
        "cpu_s_per_step": (b.cpu - a.cpu) / steps_in_launch,
    }


def main() -> int:
    global WIDTH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="on the disk to swap to; gets model/, run/, nvme/, export/ (removed) and report.json")
    parser.add_argument("--ram-gb", type=float, help="size for this much RAM (GiB) instead of the machine's")
    parser.add_argument("--limit-memory", action="store_true",
                        help="run the launches in a memory cgroup limited to --ram-gb (enforced, not pretended)")
    parser.add_argument("--min-ratio", type=float, default=1.3, help="model states / RAM to reach (default 1.3)")
    parser.add_argument("--layers", type=int, help="use this many layers instead of choosing")
    parser.add_argument("--width", type=int, default=WIDTH, help="layer width (default GPT-J's 4096)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps before the checkpoint (default 3)")
    parser.add_argument("--seq-len", type=int, default=16,
                        help="tokens per row (bf16 matmuls are slow on CPUs); above about 20 the one example trained "
                             "is a single row, fewer than the 2 ranks' batch, and the trainer refuses it")
    parser.add_argument("--lr", type=float, default=3e-5,
                        help="Adam moves every weight by about lr per step: 1e-4 already overshoots at width 4096")
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--timeout-h", type=float, default=6.0, help="per launch")
    parser.add_argument("--reference", action="store_true", help="also train with zero3_offload (states in RAM)")
    parser.add_argument("--keep", action="store_true", help="keep the model, run dir and export")
    args = parser.parse_args()
    WIDTH = args.width

    import psutil

    work = args.work_dir.expanduser().absolute()
    work.mkdir(parents=True, exist_ok=True)
    real_ram = psutil.virtual_memory().total
    ram = int(args.ram_gb * GiB) if args.ram_gb else real_ram
    if args.limit_memory and not args.ram_gb:
        raise SystemExit("--limit-memory needs --ram-gb: the limit to enforce.")
    free_disk = shutil.disk_usage(work).free
    layers = choose_layers(ram, free_disk, min_ratio=args.min_ratio, seq_len=args.seq_len, layers=args.layers)
    P = parameters(layers)
    command = " ".join([Path(sys.executable).name, "bench/out_of_core.py", *sys.argv[1:]])
    report: dict = {
        "command": command,
        "machine": {"cpus": os.cpu_count(), "ram_bytes": real_ram, "ram_sized_for_bytes": ram,
                    "free_disk_bytes": free_disk},
        "model": {"layers": layers, "width": WIDTH, "heads": HEADS, "vocab": VOCAB, "parameters": P,
                  "model_state_bytes": 16 * P, "model_states_over_ram": 16 * P / ram},
        "disk_need_bytes": disk_need(layers, args.seq_len),
    }
    print(f"{layers} layers of width {WIDTH}: {P / 1e9:.3f}B parameters, model states {16 * P / GiB:.1f} GiB = "
          f"{16 * P / ram:.2f}x the {ram / GiB:.1f} GiB of RAM; {free_disk / GiB:.0f} GiB free on {work}", flush=True)

    model_dir, run_dir, nvme, export_dir = work / "model", work / "run", work / "nvme", work / "export"
    for path in (model_dir, run_dir, nvme, export_dir, work / "reference"):
        shutil.rmtree(path, ignore_errors=True)
    nvme.mkdir()
    checks: dict[str, bool] = {}
    cgroup = MemoryCgroup.create(ram) if args.limit_memory else None
    report["machine"]["enforced_memory_limit_bytes"] = ram if cgroup else None
    try:
        report["disk_bandwidth"] = disk_bandwidth(work)
        print(f"disk (O_DIRECT, 1 MiB blocks): {report['disk_bandwidth']}", flush=True)

        import torch
        from load_memory import write_checkpoint

        start = time.perf_counter()
        write_checkpoint(model_dir, layers=layers, width=WIDTH, vocab=VOCAB, dtype=torch.bfloat16)
        report["checkpoint"] = {"bytes": dir_bytes(model_dir, "*.safetensors"), "write_s": time.perf_counter() - start}
        print(f"wrote {model_dir} ({report['checkpoint']['bytes'] / GiB:.2f} GiB) in "
              f"{report['checkpoint']['write_s']:.0f} s", flush=True)

        env, timeout = environment(), args.timeout_h * 3600
        launches = {}
        for name, stop in (("first", True), ("resumed", False)):
            last = args.steps if stop else args.steps + 1  # the progress bar's count once the launch's last step ran
            marks = {"train": r"Training clm|Resuming at step", "steps done": rf"\b{last}/{args.steps + 1} \[",
                     "done": r"Done\. Run dir|Stopped after step"}
            cmd = train_command(run_dir, model_dir, nvme, seq_len=args.seq_len, steps=args.steps, lr=args.lr,
                                config="zero3_nvme", stop=stop)
            print(f"launch ({name}): {' '.join(cmd)}", flush=True)
            w = watch(cmd, env=env, log=work / f"{name}.log", swap_root=nvme, sample_s=args.sample_s, marks=marks,
                      timeout=timeout, cgroup=cgroup)
            launches[name] = w
            print(f"  exit {w.returncode} after {w.seconds:.0f} s; peak node RSS {w.peak('rss') / GiB:.2f} GiB, "
                  f"swap {w.peak('nvme') / GiB:.2f} GiB", flush=True)
            if w.returncode:
                print(w.output[-5000:], file=sys.stderr)
                killed = f" ({cgroup.oom_kills()} OOM kills at the {ram / GiB:.1f} GiB limit)" if cgroup else ""
                raise SystemExit(f"the {name} launch failed{killed}; see {work / (name + '.log')}")
        first, resumed = launches["first"], launches["resumed"]

        # 4. the lazy export of the last checkpoint
        export_cmd = [sys.executable, str(ROOT / "launch" / "export.py"), f"checkpoint={run_dir / 'checkpoints'}",
                      f"out={export_dir}", "dtype=bf16", "max_shard_size=1GB"]
        exported = watch(export_cmd, env=env, log=work / "export.log", swap_root=None, sample_s=args.sample_s / 2,
                         marks={}, timeout=timeout, cgroup=cgroup)
        if exported.returncode:
            print(exported.output[-5000:], file=sys.stderr)
            raise SystemExit("launch/export.py failed")

        reference = None
        if args.reference:
            ref_dir = work / "reference"
            cmd = train_command(ref_dir, model_dir, nvme, seq_len=args.seq_len, steps=args.steps, lr=args.lr,
                                config="zero3_offload", stop=True)
            reference = watch(cmd, env=env, log=work / "reference.log", swap_root=None, sample_s=args.sample_s,
                              marks={}, timeout=timeout)
            if reference.returncode:
                print(reference.output[-5000:], file=sys.stderr)
                raise SystemExit("the zero3_offload reference failed")

        # --- the report ---------------------------------------------------------------------------------
        from finetune.planning.estimate import CPU_ACCELERATOR_PROCESS_BYTES

        est = planner_estimate(layers, args.seq_len)
        host_planned = est.cpu_bytes + WORLD * est.gpu_bytes  # the CPU accelerator's "GPU" items are host RAM too
        node_peak = max(first.peak("rss"), resumed.peak("rss"))
        ranks_peak = max(first.peak("ranks_rss"), resumed.peak("ranks_rss"))
        ranks_anon = max(first.peak("ranks_anon"), resumed.peak("ranks_anon"))
        node_anon = max(first.peak("anon"), resumed.peak("anon"))
        nvme_peak = max(first.peak("nvme"), resumed.peak("nvme"))
        losses = train_losses(run_dir)
        times = step_times(run_dir)
        final_bytes = dir_bytes(run_dir / "final", "*.safetensors")
        export_bytes = dir_bytes(export_dir, "*.safetensors")
        save_export = (resumed.marks.get("steps done"), resumed.marks.get("done"))
        in_run_export_peak = resumed.peak("ranks_rss", *save_export) if None not in save_export else None
        io = phase_stats(first, args.steps)
        bandwidth = report["disk_bandwidth"]
        io_s = (io.get("read_bytes_per_step", 0) / 1e9 / bandwidth["read_GBps"]
                + io.get("written_bytes_per_step", 0) / 1e9 / bandwidth["write_GBps"]) if io else None
        mean_step = sum(times[s] for s in range(2, args.steps + 1)) / max(1, args.steps - 1) if times else None
        report.update({
            "planner": {"cpu_bytes": est.cpu_bytes, "gpu_bytes_per_rank": est.gpu_bytes, "host_bytes": host_planned,
                        "nvme_bytes": est.nvme_bytes,
                        "items": [{"name": i.name, "device": i.device, "phase": i.phase, "bytes": i.bytes}
                                  for i in est.items]},
            "memory": {"node_peak_rss": node_peak, "node_peak_anon": node_anon, "ranks_peak_rss": ranks_peak,
                       "ranks_peak_anon": ranks_anon,
                       "by_launch": {n: {"node_peak_rss": w.peak("rss"), "ranks_peak_rss": w.peak("ranks_rss"),
                                         "load_peak_rss": w.peak("rss", 0, w.marks.get("train", math.inf)),
                                         "train_peak_rss": w.peak("rss", w.marks.get("train", 0),
                                                                  w.marks.get("steps done", math.inf))}
                                     for n, w in launches.items()},
                       "planner_host_error": node_anon / host_planned - 1},
            "nvme": {"peak_bytes": nvme_peak, "planner_bytes": est.nvme_bytes,
                     "planner_error": nvme_peak / est.nvme_bytes - 1},
            "steps": {"losses": losses, "step_time_s": times, "mean_step_s_after_first": mean_step,
                      "first_launch_window": io, "swap_io_s_per_step_at_disk_bandwidth": io_s,
                      "launch_s": {n: w.seconds for n, w in launches.items()}},
            "export": {"final_bytes": final_bytes, "in_run_save_and_export_peak_ranks_rss": in_run_export_peak,
                       "export_py_bytes": export_bytes, "export_py_peak_rss": exported.peak("ranks_rss"),
                       "export_py_peak_anon": exported.peak("ranks_anon"), "export_py_s": exported.seconds},
        })
        if reference is not None:
            ref_times = step_times(work / "reference")
            ref_mean = sum(ref_times[s] for s in range(2, args.steps + 1)) / max(1, args.steps - 1)
            report["reference_cpu_offload"] = {
                "losses": train_losses(work / "reference"), "mean_step_s_after_first": ref_mean,
                "node_peak_rss": reference.peak("rss"), "nvme_over_cpu_offload_step_time": mean_step / ref_mean}

        values = list(losses.values())
        checks = {
            "node peak RSS below the machine's RAM": node_peak < real_ram,
            **({"within the enforced memory limit (no OOM kill)": cgroup.oom_kills() == 0 and node_peak < ram}
               if cgroup else {}),
            "resumed from the checkpoint": f"Resuming at step {args.steps}" in resumed.output,
            f"{args.steps + 1} steps logged": sorted(losses) == list(range(1, args.steps + 2)),
            "losses finite": all(math.isfinite(v) for v in values),
            "loss falls from the first step to the last": bool(values) and values[-1] < values[0],
            "planner host memory within 20%": abs(report["memory"]["planner_host_error"]) <= 0.2,
            "planner NVMe within 20%": abs(report["nvme"]["planner_error"]) <= 0.2,
            # Consolidating in memory holds every fp32 master weight: 2x a bf16 export, before writing anything.
            # The process itself (Python, torch: the planner's 0.5 GiB) does not grow with the model.
            "export streams (peak above the process below 2x the exported size)":
                exported.peak("ranks_anon") - CPU_ACCELERATOR_PROCESS_BYTES < 2 * export_bytes,
            "swap directory removed": not any(nvme.iterdir()),
        }
        if cgroup is not None:
            report["memory"]["cgroup"] = {"limit": ram, "peak_charge_with_page_cache": cgroup.peak(),
                                          "oom_kills": cgroup.oom_kills()}
        report["checks"] = checks
    finally:
        if cgroup is not None:
            cgroup.remove()
        if not args.keep:
            for path in (model_dir, run_dir, nvme, export_dir, work / "reference"):
                shutil.rmtree(path, ignore_errors=True)
        (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"report: {work / 'report.json'}")
    return 0 if all(checks.values()) else 1


def summary(r: dict) -> str:
    m, n, s, e, p = r["memory"], r["nvme"], r["steps"], r["export"], r["planner"]
    g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    ram = r["machine"]["ram_sized_for_bytes"]
    lines = [
        f"model: {r['model']['layers']} layers x {WIDTH}, {r['model']['parameters'] / 1e9:.3f}B parameters; model "
        f"states {g(r['model']['model_state_bytes'])} = {r['model']['model_states_over_ram']:.2f}x RAM ({g(ram)})",
        f"node peak RSS {g(m['node_peak_rss'])} of {g(ram)} RAM ({m['node_peak_rss'] / ram:.0%}), anonymous "
        f"{g(m['node_peak_anon'])}; ranks {g(m['ranks_peak_rss'])}; planner (host + 2 x device items, "
        f"CPU accelerator) {g(p['host_bytes'])}: anonymous {m['planner_host_error']:+.0%}",
        f"NVMe swap peak {g(n['peak_bytes'])}; planner {g(n['planner_bytes'])}: {n['planner_error']:+.0%}",
        f"step time: {s['mean_step_s_after_first']:.1f} s (steps 2-{len(s['losses']) - 1}); first launch per step: "
        f"CPU {s['first_launch_window'].get('cpu_s_per_step', 0):.1f} s (2 ranks), read "
        f"{s['first_launch_window'].get('read_bytes_per_step', 0) / 1e9:.1f} GB, written "
        f"{s['first_launch_window'].get('written_bytes_per_step', 0) / 1e9:.1f} GB = "
        f"{(s['swap_io_s_per_step_at_disk_bandwidth'] or 0):.1f} s at the disk's bandwidth",
        f"losses: {', '.join(f'{k}: {v:.3f}' for k, v in s['losses'].items())}",
        f"export: final/ {g(e['final_bytes'])} (in-run save + export peak rank RSS "
        f"{g(e['in_run_save_and_export_peak_ranks_rss'] or 0)}); launch/export.py {g(e['export_py_bytes'])} with "
        f"peak RSS {g(e['export_py_peak_rss'])}, anonymous {g(e['export_py_peak_anon'])} "
        f"({e['export_py_peak_anon'] / max(1, e['export_py_bytes']):.2f}x the exported size)",
    ]
    if "cgroup" in m:
        c = m["cgroup"]
        lines.append(f"enforced limit {g(c['limit'])} (memory cgroup): peak charge incl. page cache "
                     f"{g(c['peak_charge_with_page_cache'] or 0)}, OOM kills {c['oom_kills']}")
    if "reference_cpu_offload" in r:
        ref = r["reference_cpu_offload"]
        lines.append(f"CPU offload reference: {ref['mean_step_s_after_first']:.1f} s/step; NVMe / CPU offload = "
                     f"{ref['nvme_over_cpu_offload_step_time']:.2f}x; peak node RSS {g(ref['node_peak_rss'])}")
    lines += [f"  [{'ok' if ok else 'FAIL'}] {name}" for name, ok in r.get("checks", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
