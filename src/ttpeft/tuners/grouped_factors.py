"""Tuner mixin: build the thin factors of all TT layers together before each model forward."""

from __future__ import annotations

from ..factor_cache import begin_forward, prepare_factors


class GroupedFactorsMixin:
    """For ``BaseTuner`` subclasses whose layers implement ``factor_refs_to_prepare()``.

    ``group_factors = False`` makes every layer build its own factors (for comparison).
    """

    group_factors: bool = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # On the wrapped model, not the tuner: generate() calls the model directly.
        self._factor_hook = self.model.register_forward_pre_hook(self._prepare_factors_hook)

    def _prepare_factors_hook(self, module, args):
        if self.group_factors:
            # In a mixed-adapter batch, every adapter the batch names, not only the active ones.
            prepare_factors((m for m in module.modules() if isinstance(m, self.tuner_layer_cls)),
                            getattr(self, "_batch_adapter_names", None))
        else:
            begin_forward()

    def _unload_and_optionally_merge(self, *args, **kwargs):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        # Only once it succeeded: a refused merge leaves the adapted model working.
        hook = getattr(self, "_factor_hook", None)
        if hook is not None:
            hook.remove()
            self._factor_hook = None
        return model
