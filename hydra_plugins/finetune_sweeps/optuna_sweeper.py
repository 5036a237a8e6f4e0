"""`hydra/sweeper=optuna`: a search over config keys with Optuna's ask/tell API (conf/hydra/sweeper/optuna.yaml).

    python launch/train.py -m hydra/sweeper=optuna 'optim.lr=tag(log,interval(1e-5,1e-3))' 'lora.r=choice(8,16,32)'

Overrides that sweep (`choice`, `range`, `interval`, `tag(log, interval(...))`) span the search space, as in
hydra-optuna-sweeper; the others are passed to every trial as given. Trials are launched `n_jobs` at a time through
the configured launcher (in this process, or one SLURM job each with `hydra/launcher=submitit_slurm`).

What the trial returns is its objective (launch/train.py: `sweep.objective`, by default the task's metric, with its
direction). A trial that fails (an exception, a stop, a job that ended without a result) is told to Optuna as FAIL
with its reason, never as a score, and the search goes on. After every batch the sweep dir's `trials.json` holds
every trial (params, state, value, reason, run dir): the summary and the pictures read it (finetune.tools.sweep,
finetune.tools.report), also while the sweep runs.

The sampler is seeded (`seed`), so the same command draws the same trials again. Under the deepspeed launcher every
rank runs this sweeper; they draw the same trials because they are seeded alike and are told the same values (rank
0's, launch/train.py), and only rank 0 writes files.

Why not hydra-optuna-sweeper: its 1.3.0 pins optuna<3 (2.10.1, unmaintained), takes the direction from its own
config rather than from the task's metric, keeps no failure reason and writes nothing until the sweep ends.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from finetune.tools.sweep import TRIALS_FILE, objective_of  # light: no torch until a task must be looked up

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, *, n_trials: int, n_jobs: int, seed: Optional[int], sampler: Any = None,
                 study_name: Optional[str] = None, params: Optional[Any] = None) -> None:
        if n_trials < 1 or n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials} and hydra.sweeper.n_jobs={n_jobs} must both be at "
                             "least 1.")
        self.n_trials, self.n_jobs, self.seed = n_trials, n_jobs, seed
        self.sampler = sampler  # instantiated by Hydra from the config (seeded there), or None
        self.study_name = study_name
        self.params = params
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        from hydra.errors import HydraException

        try:
            return self._sweep(arguments)
        except ValueError as error:  # a wrong search space or sweep config: one paragraph, no traceback (finetune.cli)
            raise HydraException(str(error)) from None

    def _sweep(self, arguments: list[str]) -> list[JobReturn]:
        import optuna

        from finetune.distributed import env_rank

        assert self.config is not None and self.hydra_context is not None
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.seed is None and world_size > 1:
            raise ValueError(
                f"hydra.sweeper.seed=null under a launcher of {world_size} ranks: every rank runs the sweeper and "
                "they must draw the same trials. Set hydra.sweeper.seed=<int> (any; the same seed redraws the same "
                "trials).")
        space, fixed = search_space(self._sweeper_params() + list(arguments))
        if not space:
            raise ValueError(
                "hydra/sweeper=optuna: nothing to search. Give at least one override that sweeps, e.g. "
                "'optim.lr=tag(log,interval(1e-5,1e-3))' or 'lora.r=choice(8,16,32)' (quoted for the shell).")
        objective, direction = objective_of(self.config)
        is_main = env_rank() == 0
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        if is_main:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = self.sampler if self.sampler is not None else optuna.samplers.TPESampler(seed=self.seed)
        study = optuna.create_study(study_name=self.study_name, sampler=sampler,
                                    direction="maximize" if direction == "maximize" else "minimize")
        record = SweepRecord(sweep_dir, objective=objective, direction=direction, seed=self.seed,
                             space={name: describe(dist) for name, dist in space.items()}, write=is_main)
        log.info("Optuna: %d trials, %d at a time, %s %s, seed %s", self.n_trials, self.n_jobs, direction, objective,
                 self.seed)
        returns: list[JobReturn] = []
        while len(returns) < self.n_trials:
            trials = [study.ask(fixed_distributions=space) for _ in range(min(self.n_jobs, self.n_trials - len(returns)))]
            batch = [[*fixed, *(f"{name}={format_value(trial.params[name])}" for name in space)] for trial in trials]
            self.validate_batch_is_legal(batch)
            first = len(returns)
            run_dirs = [self._run_dir(overrides, first + offset) for offset, overrides in enumerate(batch)]
            for offset, (trial, overrides) in enumerate(zip(trials, batch)):
                record.start(trial.number, job=first + offset, params=trial.params, overrides=overrides,
                             run_dir=run_dirs[offset])
            results = self.launcher.launch(batch, initial_job_idx=first)
            exhausted = False
            for trial, run_dir, result in zip(trials, run_dirs, results):
                value, reason = outcome(result, objective)
                if reason is None:
                    exhausted |= tell(study, trial, values=value)
                    log.info("Trial %d: %s=%.6g (%s)", trial.number, objective, value, run_dir)
                else:
                    trial.set_user_attr("failure", reason)
                    exhausted |= tell(study, trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("Trial %d failed (%s): %s", trial.number, run_dir, reason)
                record.finish(trial.number, value=value, reason=reason)
            returns.extend(results)
            if exhausted:
                log.info("The sampler has tried its whole search space after %d trials", len(returns))
                break
        completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if completed:
            log.info("Best trial %d: %s=%.6g with %s", study.best_trial.number, objective, study.best_value,
                     study.best_trial.params)
        else:
            log.warning("No trial completed; %s lists every failure", sweep_dir / TRIALS_FILE)
        return returns

    def _sweeper_params(self) -> list[str]:
        """`hydra.sweeper.params` (a search space kept in a config file) as overrides; the command line comes after."""
        if not self.params:
            return []
        return [f"{key}={value}" for key, value in self.params.items()]

    def _run_dir(self, overrides: Sequence[str], job_num: int) -> str:
        """The trial's run dir (hydra.sweep.subdir), relative to the sweep dir, composed as the launcher will: known
        before the job starts, and also for a job whose result is lost with it."""
        assert self.config is not None and self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = job_num
        return str(cfg.hydra.sweep.subdir)


def tell(study: Any, trial: Any, **outcome: Any) -> bool:
    """study.tell; True when the sampler has exhausted its space (Grid/BruteForceSampler call `study.stop()`, which
    outside `study.optimize` raises after the trial is stored)."""
    try:
        study.tell(trial, **outcome)
    except RuntimeError as error:
        if "Study.stop" not in str(error):
            raise
        return True
    return False


def search_space(overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Sweep overrides -> {key: Optuna distribution}; the other overrides, as written. A later override of a key
    replaces an earlier one (the command line over hydra.sweeper.params)."""
    parsed = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        parsed[override.get_key_element()] = override
    space = {key: distribution(o) for key, o in parsed.items() if o.is_sweep_override()}
    fixed = [o.input_line for key, o in parsed.items() if not o.is_sweep_override()]
    return space, fixed


def distribution(override: Override) -> Any:
    """One sweep override as an Optuna distribution: choice -> categorical, range -> stepped int/float,
    interval -> uniform float (Hydra reads its ends as floats; tag(int, interval(...)) searches integers),
    tag(log, interval(...)) -> log-uniform."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(x, int) for x in (start, stop, step)):  # range() excludes stop
            return IntDistribution(start, stop - step, step=step)
        last = start + math.floor((stop - start) / step - 1e-9) * step
        return FloatDistribution(start, last, step=step)
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if log_scale and value.start <= 0:
            raise ValueError(f"{override.input_line}: a log interval needs a positive start.")
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{override.input_line}: {key} sweeps in a way Optuna cannot search; use choice(...), "
                     "range(...), interval(...), tag(log,interval(...)) or tag(int,interval(...)).")


def describe(dist: Any) -> dict[str, Any]:
    """A distribution as JSON for trials.json (what the pictures need: categorical or not, log scale or not)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return {"type": "categorical", "choices": list(dist.choices)}
    return {"type": "int" if type(dist).__name__ == "IntDistribution" else "float", "low": dist.low,
            "high": dist.high, "log": bool(dist.log), "step": dist.step}


def format_value(value: Any) -> str:
    """A sampled value as an override value: repr keeps every digit of a float, so the trial's command reruns it;
    None and booleans in Hydra's spelling (`None` would arrive as a string)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def outcome(result: Optional[JobReturn], objective: str) -> tuple[Optional[float], Optional[str]]:
    """(value, None) for a trial with a finite objective, (None, reason) for a failed one."""
    if result is None or result.status != JobStatus.COMPLETED:
        error = getattr(result, "_return_value", None)
        return None, str(error) if error else "the job ended without a result"
    value = result.return_value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"the trial returned {value!r}, not a number for {objective}"
    if not math.isfinite(value):
        return None, f"{objective} is {value}"
    return float(value), None


class SweepRecord:
    """trials.json in the sweep dir, rewritten whenever a trial starts or ends (atomically: readers never see half)."""

    def __init__(self, sweep_dir: Path, *, objective: str, direction: str, seed: Optional[int],
                 space: dict[str, Any], write: bool) -> None:
        self.path = sweep_dir / TRIALS_FILE
        self.write = write
        self.data: dict[str, Any] = {"sweeper": "optuna", "objective": objective, "direction": direction,
                                     "seed": seed, "search_space": space, "trials": []}

    def start(self, number: int, *, job: int, params: dict[str, Any], overrides: Sequence[str], run_dir: str) -> None:
        self.data["trials"].append({"number": number, "job": job, "params": params, "overrides": list(overrides),
                                    "state": "running", "value": None, "reason": None, "run_dir": run_dir})
        self._save()

    def finish(self, number: int, *, value: Optional[float], reason: Optional[str]) -> None:
        trial = next(t for t in self.data["trials"] if t["number"] == number)
        trial.update(state="failed" if reason else "complete", value=value, reason=reason)
        self._save()

    def _save(self) -> None:
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        partial.replace(self.path)
