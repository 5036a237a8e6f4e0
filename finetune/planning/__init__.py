"""Memory planning: the estimate of a run's memory per GPU and node (`estimate`, pure formulas) and its use at
launch (`choice`: `deepspeed=auto`, and the refusal of a config that cannot fit)."""
