"""How weights change: the objective, GRPO, the supervised loop, optimizer, checkpoints, torchrun, metrics, eval."""
