"""Probe, not a feature: the head trains alone for the first steps, inside the same step budget (LP-FT).

While the head is still random, the gradient that reaches the adapters is the head's random weight times
the residual: small and of no consistent direction, and Adam turns it into full-size steps. This probe
holds every non-head parameter group at rate 0 for the first ``TTPEFT_PROBE_HEAD_FIRST`` fraction of the
steps (Adam's moments still accumulate), then gives it the usual warm-up and linear decay over the rest;
the head keeps the usual schedule. Loaded at interpreter start when this folder is on ``PYTHONPATH``.
"""

import os

_FRACTION = float(os.environ.get("TTPEFT_PROBE_HEAD_FIRST", "0"))

if _FRACTION > 0:
    import torch
    import transformers

    from ttpeft.training import is_head_parameter

    def create_scheduler(self, num_training_steps, optimizer=None):
        optimizer = optimizer or self.optimizer
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            split = {True: [], False: []}
            for p in group["params"]:
                split[is_head_parameter(names.get(id(p), ""))].append(p)
            groups += [({**group, "params": ps}, head) for head, ps in split.items() if ps]
        optimizer.param_groups = []
        for group, _ in groups:
            optimizer.add_param_group(group)
        total, warm = num_training_steps, self.args.get_warmup_steps(num_training_steps)
        start = int(_FRACTION * total)

        def head(step):
            return step / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))

        def adapter(step):
            if step < start:
                return 0.0
            if step - start < warm:
                return (step - start) / max(1, warm)
            return max(0.0, (total - step) / max(1, total - start - warm))

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [head if is_head else adapter for _, is_head in groups])
        self._created_lr_scheduler = True
        print(f"head-first: non-head groups at rate 0 for {start} of {total} steps", flush=True)
        return self.lr_scheduler

    transformers.Trainer.create_scheduler = create_scheduler
