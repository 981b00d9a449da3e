from ...registration import register_method
from .config import TTLoraConfig
from .layer import TTLoraLayer, TTLoraLinear
from .model import TTLoraModel

__all__ = ["TTLoraConfig", "TTLoraLayer", "TTLoraLinear", "TTLoraModel"]

register_method("ttlora", config_cls=TTLoraConfig, model_cls=TTLoraModel, prefix=TTLoraModel.prefix)
