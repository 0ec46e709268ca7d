"""One dataclass of settings per command (commands.py), each field declared once with `setting()` (fields.py); from
it come the flags, their --help and the checks resolve() runs on YAML and flags alike (sources.py)."""

from r1lab.config.commands import (ChatConfig, DemoConfig, DistillConfig, EvalConfig, GRPOConfig, MergeConfig,
                                   PipelineConfig, PretrainConfig, ReportConfig, SampleConfig, ScoreConfig, ServeConfig,
                                   SFTConfig)
from r1lab.config.fields import Spec
from r1lab.config.sources import resolve, save_config

__all__ = ["ChatConfig", "DemoConfig", "DistillConfig", "EvalConfig", "GRPOConfig", "MergeConfig", "PipelineConfig",
           "PretrainConfig", "ReportConfig", "SampleConfig", "ScoreConfig", "ServeConfig", "SFTConfig", "Spec",
           "resolve", "save_config"]
