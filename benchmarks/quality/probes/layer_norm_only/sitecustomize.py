"""Probe, not a feature: ``--method head`` that also trains the layer norms whose names match
``TTPEFT_PROBE_TRAIN_NORMS`` (a regex searched in each parameter's name), so that layer-norm tuning alone can
be set beside an adapter with the same layer norms. Loaded at interpreter start when this folder is on
``PYTHONPATH``.
"""

import os
import re

_PATTERN = os.environ.get("TTPEFT_PROBE_TRAIN_NORMS")

if _PATTERN:
    from ttpeft import training

    _apply_method = training.apply_method

    def apply_method(model, method, config_fields, family):
        model, config = _apply_method(model, method, config_fields, family)
        if method.name == "head":
            for name, param in model.named_parameters():
                if re.search(_PATTERN, name):
                    param.requires_grad = True
        return model, config

    training.apply_method = apply_method
