"""Probe, not a feature: TT-LoRA started from the principal part of the weight it adapts (PiSSA, Meng et al.
2024, in tensor-train form).

With ``TTPEFT_PROBE_PISSA=1`` every TT-LoRA layer's cores are replaced, after the method is applied, by the
TT-SVD of ``W0^T / alpha`` at the layer's own shape and ranks (its middle bond keeps the top singular
directions of ``W0``), rescaled so every core has the same norm (their product unchanged), and the base
weight becomes the residual ``W0 - alpha * ΔW``: the model starts exactly where it was, but every core is
non-zero and lies along the weight's largest directions, so the first steps move all of them. The residual
is not saved with the adapter: the run is scored in memory, which is what the grid reports.
Loaded at interpreter start when this folder is on ``PYTHONPATH``.
"""

import os

if os.environ.get("TTPEFT_PROBE_PISSA") == "1":
    import torch

    from ttpeft import training
    from ttpeft.tensor_train import tt_svd

    _apply_method = training.apply_method

    def _principal_cores(weight, alpha, in_factors, out_factors, ranks):
        target = (weight.T.to(torch.float64) / alpha).reshape(*in_factors, *out_factors)
        cores = [c.to(torch.float64) for c in tt_svd(target, max_rank=ranks).cores]
        norms = [float(torch.linalg.norm(c)) for c in cores]
        level = torch.tensor(norms, dtype=torch.float64).log().mean().exp().item()
        return [c * (level / n) for c, n in zip(cores, norms)]

    def apply_method(model, method, config_fields, family):
        model, config = _apply_method(model, method, config_fields, family)
        moved = 0
        for name, module in model.named_modules():
            if not hasattr(module, "ttlora_cores"):
                continue
            base = module.get_base_layer()
            for adapter, params in module.ttlora_cores.items():
                in_factors, out_factors = module.ttlora_shape[adapter]
                alpha = module.ttlora_alpha[adapter]
                ranks = [p.shape[2] for p in params][:-1]
                cores = _principal_cores(base.weight.data, alpha, in_factors, out_factors, ranks)
                if [tuple(c.shape) for c in cores] != [tuple(p.shape) for p in params]:
                    raise RuntimeError(f"{name}: TT-SVD shapes {[c.shape for c in cores]} differ from the cores'")
                with torch.no_grad():
                    for p, c in zip(params, cores):
                        p.copy_(c.to(p.dtype))
                    module.factor_cache.entries.pop(adapter, None)
                    delta = module.get_delta_weight(adapter)
                    kept = torch.linalg.norm(delta) / torch.linalg.norm(base.weight)
                    base.weight.data -= delta.to(base.weight.dtype)
                moved += 1
                print(f"pissa: {name}: ranks {ranks}, the adapter holds {kept:.3f} of |W0|", flush=True)
        print(f"pissa: {moved} layers", flush=True)
        return model, config

    training.apply_method = apply_method
