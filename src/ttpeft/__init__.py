"""ttpeft: tensor-train parameter-efficient fine-tuning, as peft methods.

Importing ttpeft registers its methods with peft, so ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` work for them as for LoRA.
"""

from .tensor_train import TensorTrain, tt_num_params, tt_svd
from .compress import compress_lora
from .tuners.ttlora import TTLoraConfig, TTLoraModel
from .tuners.loretta_rep import LorettaRepConfig, LorettaRepModel
from .tuners.loretta_adp import LorettaAdpConfig, LorettaAdpModel

__version__ = "0.1.0"

__all__ = ["TTLoraConfig", "TTLoraModel", "TensorTrain", "tt_num_params", "tt_svd", "__version__"]
__all__ += ["compress_lora"]
__all__ += ["LorettaAdpConfig", "LorettaAdpModel", "LorettaRepConfig", "LorettaRepModel"]
