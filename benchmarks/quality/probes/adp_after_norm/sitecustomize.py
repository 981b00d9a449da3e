"""Probe, not a feature: LoRETTA_adp's adapters on the output of a block's LayerNorm instead of its dense layer.

In a post-LN block (BERT) an output adapter on ``*.output.dense`` adds to a dense output whose size differs
40-230x between layers, and Adam grows every adapter's output at about the same pace, so the adapters on the
small outputs take their block over first (README). With ``TTPEFT_PROBE_ADP_AFTER_NORM=1``, LoRETTA_adp also
accepts ``nn.LayerNorm`` targets: ``y = LN(x); y + adapter(y)``. A norm's output has one scale in every layer,
and the adapter's change goes straight into the residual stream. Target the norms with
``--target-modules '.*layer\\.\\d+\\.(attention\\.)?output\\.LayerNorm'`` (and ``--train-layernorms false``).
Loaded at interpreter start when this folder is on ``PYTHONPATH``.
"""

import os

if os.environ.get("TTPEFT_PROBE_ADP_AFTER_NORM") == "1":
    from torch import nn

    from ttpeft.tuners.loretta_adp import layer as adp_layer
    from ttpeft.tuners.loretta_adp import model as adp_model
    from ttpeft.tuners.ttlora import layer as ttlora_layer  # the budget planner reads the sizes from here

    def _with_norms(features):
        def base_layer_features(base_layer):
            if isinstance(base_layer, nn.LayerNorm):
                width = base_layer.normalized_shape[0]
                return width, width
            return features(base_layer)
        return base_layer_features

    for module in (adp_layer, ttlora_layer):
        module.base_layer_features = _with_norms(module.base_layer_features)

    _create_and_replace = adp_model.LorettaAdpModel._create_and_replace

    def create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, nn.LayerNorm):
            layer_config = adp_model.config_for_layer(config, current_key)
            new_module = adp_layer.LorettaAdpLinear(target, adapter_name, layer_config, module_name=current_key,
                                                    placement="output")
            self._replace_module(parent, target_name, new_module, target)
            return
        return _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs)

    adp_model.LorettaAdpModel._create_and_replace = create_and_replace
