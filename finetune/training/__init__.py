"""Training: the DeepSpeed engine, the one loop for every task, data order, evaluation, training checkpoints
(DeepSpeed state, committed atomically), LoRA, fault handling and preemption."""
