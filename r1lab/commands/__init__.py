"""The R1 recipe as commands: demo, pretrain, distill, pipeline and its stages, sample, report, merge."""
