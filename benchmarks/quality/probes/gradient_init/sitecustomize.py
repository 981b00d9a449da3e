"""Probe, not a feature: TT-LoRA's random cores aligned with the loss gradient before training.

With the last core zero, only that core moves at the first step, and ΔW can only grow in the subspace the
random cores span. This probe replaces them, before the first step, by the left cores of a TT-SVD of
``dL/dW`` (the base weight's gradient, summed over ``TTPEFT_PROBE_GRAD_BATCHES`` training batches) at the
layer's own shape and ranks, each rescaled to the norm of the random core it replaces (Adam's steps do
not depend on a core's size, so the size is kept). The last core stays zero, so the model starts at the
base model and nothing in the base weights changes (the half of LoRA-GA, Wang et al. 2024, that keeps
``B = 0``). Loaded at interpreter start when this folder is on ``PYTHONPATH`` and
``TTPEFT_PROBE_GRAD_BATCHES`` is set. README, "More probes on the held-out slice".
"""

import os

_BATCHES = int(os.environ.get("TTPEFT_PROBE_GRAD_BATCHES", "0"))

if _BATCHES > 0:
    import itertools

    import torch
    import transformers

    from ttpeft.tensor_train import tt_svd
    from ttpeft.tuners.ttlora.layer import TTLoraLayer

    _train = transformers.Trainer.train

    def _align_cores(trainer):
        model = trainer.model
        layers = [m for m in model.modules() if isinstance(m, TTLoraLayer)]
        weights = [layer.get_base_layer().weight for layer in layers]
        for weight in weights:
            weight.requires_grad_(True)
            weight.grad = None
        model.train()
        for inputs in itertools.islice(trainer.get_train_dataloader(), _BATCHES):
            loss = trainer.compute_loss(model, trainer._prepare_inputs(inputs))
            loss.backward()
        for layer, weight in zip(layers, weights):
            for name, cores in layer.ttlora_cores.items():
                in_factors, out_factors = layer.ttlora_shape[name]
                ranks = [core.shape[2] for core in cores[:-1]]
                gradient = weight.grad.detach().float().T.reshape(*in_factors, *out_factors)  # ΔW^T layout
                train = tt_svd(gradient, max_rank=ranks)
                with torch.no_grad():
                    for core, aligned in list(zip(cores, train.cores))[:-1]:
                        if aligned.shape != core.shape:  # a gradient of lower rank than the bond: keep random
                            continue
                        core.copy_(aligned * (core.norm() / aligned.norm().clamp_min(1e-12)))
            weight.grad = None
            weight.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        print(f"gradient-aligned init: {len(layers)} TT-LoRA layers, {_BATCHES} batches", flush=True)

    def train(self, *args, **kwargs):
        _align_cores(self)
        return _train(self, *args, **kwargs)

    transformers.Trainer.train = train
