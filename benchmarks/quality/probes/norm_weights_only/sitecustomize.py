"""Probe, not a feature: trained layer norms keep their biases frozen, so each costs its weight alone.

A LayerNorm weight scales the residual stream channel by channel, as IA3's vectors scale a projection's
output; its bias shifts it. With ``TTPEFT_PROBE_NORM_WEIGHTS_ONLY=1`` every trainable bias of a normalisation
layer is frozen after the method is applied (before the parameter count and the optimiser), which halves
what a trained norm costs. Loaded at interpreter start when this folder is on ``PYTHONPATH``.
"""

import os

if os.environ.get("TTPEFT_PROBE_NORM_WEIGHTS_ONLY") == "1":
    from ttpeft import training
    from ttpeft.tuners.loretta_common import is_norm_module

    _apply_method = training.apply_method

    def apply_method(model, method, config_fields, family):
        model, config = _apply_method(model, method, config_fields, family)
        frozen = 0
        for module in model.modules():
            if is_norm_module(module) and getattr(module, "bias", None) is not None and module.bias.requires_grad:
                module.bias.requires_grad_(False)
                frozen += module.bias.numel()
        print(f"norm-weights-only: {frozen} norm bias parameters frozen", flush=True)
        return model, config

    training.apply_method = apply_method
