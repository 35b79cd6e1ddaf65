"""Run configuration: schema (dataclasses), loader (YAML + dotted overrides), DeepSpeed JSON resolution."""

from bigmodel_dist.config.loader import load_config, save_config, to_dict
from bigmodel_dist.config.schema import Config

__all__ = ["Config", "load_config", "save_config", "to_dict"]
