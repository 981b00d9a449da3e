from ...registration import register_method
from .config import LorettaRepConfig
from .layer import LorettaRepHead, LorettaRepLayer, LorettaRepLinear
from .model import LorettaRepModel

__all__ = ["LorettaRepConfig", "LorettaRepHead", "LorettaRepLayer", "LorettaRepLinear", "LorettaRepModel"]

register_method("loretta_rep", config_cls=LorettaRepConfig, model_cls=LorettaRepModel, prefix=LorettaRepModel.prefix)
