"""One dataclass of settings per command (commands.py), each field declared once with `setting()` (fields.py): its
default, a one-line help text and the values it allows, its type the annotation. From it come the flag and its --help
line (r1lab/cli.py) and the checks resolve() runs on YAML and flags alike before anything loads (sources.py); settings
several commands share are declared once (groups.py). A run's resolved config is saved with it, to rerun it exactly."""

from r1lab.config.commands import (ChatConfig, DemoConfig, DistillConfig, EvalConfig, GRPOConfig, MergeConfig,
                                   PipelineConfig, PretrainConfig, ReportConfig, SampleConfig, ScoreConfig, ServeConfig,
                                   SFTConfig)
from r1lab.config.fields import Spec
from r1lab.config.sources import resolve, save_config

__all__ = ["ChatConfig", "DemoConfig", "DistillConfig", "EvalConfig", "GRPOConfig", "MergeConfig", "PipelineConfig",
           "PretrainConfig", "ReportConfig", "SampleConfig", "ScoreConfig", "ServeConfig", "SFTConfig", "Spec",
           "resolve", "save_config"]
