"""This project's Hydra plugins: the Optuna sweeper (`hydra/sweeper=optuna`) and the SLURM launcher that records a
lost job as a failed sweep point (`hydra/launcher=submitit_slurm`). Found by Hydra in the `hydra_plugins` namespace
package; modules import their heavy dependencies lazily, because Hydra imports every plugin at each start."""
