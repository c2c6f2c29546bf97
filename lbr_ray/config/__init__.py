"""Typed configs: `load_config(path, overrides)` -> LbrConfig."""
from lbr_ray.config.load import (
    config_from_dict, load_config, replace, save_config, to_dict, to_yaml, with_overrides,
)
from lbr_ray.config.schema import (
    BottleneckConfig, DataConfig, DeepSpeedConfig, GRCLConfig, IBGLConfig, LbrConfig, ModelConfig,
    RunConfig, ScalingConfig, SplitConfig,
)

__all__ = [
    "load_config", "config_from_dict", "replace", "save_config", "to_dict", "to_yaml", "with_overrides", "LbrConfig",
    "ModelConfig", "BottleneckConfig", "DataConfig", "SplitConfig", "IBGLConfig", "GRCLConfig",
    "DeepSpeedConfig", "ScalingConfig", "RunConfig",
]
