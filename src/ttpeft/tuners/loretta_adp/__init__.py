from ...registration import register_method
from .config import LorettaAdpConfig
from .layer import LorettaAdpHead, LorettaAdpLayer, LorettaAdpLinear
from .model import LorettaAdpModel

__all__ = ["LorettaAdpConfig", "LorettaAdpHead", "LorettaAdpLayer", "LorettaAdpLinear", "LorettaAdpModel"]

register_method("loretta_adp", config_cls=LorettaAdpConfig, model_cls=LorettaAdpModel, prefix=LorettaAdpModel.prefix)
