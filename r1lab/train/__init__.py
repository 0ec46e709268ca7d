"""How weights change: the objective, GRPO, the supervised loop, optimizer and schedule, the in-backward step,
checkpoints and resume, torchrun, sharding, metrics and evaluation.
"""
