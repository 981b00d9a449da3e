"""Mixed-adapter batches: ``model(**batch, adapter_names=[...])`` runs each row with its own adapter.

peft's LoRA does this with a context manager on its tuner that injects ``adapter_names`` into every
LoRA layer's forward; ``BaseTuner`` has no generic version, so this is the same mechanism for the
ttpeft tuners, reusing peft's pre-forward hook, its encoder lookup and its ``modules_to_save`` wrapper.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
from peft.tuners.lora.model import _adapter_names_pre_forward_hook, _get_encoder
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

BASE = "__base__"  # peft's name for "no adapter" in adapter_names

# Modules peft's ModulesToSaveWrapper accepts in a mixed batch; others (layer norms) get row_wise_forward.
_PEFT_MIXED_MODULES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def row_groups(adapter_names: list[str], device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """``(adapter, row indices)`` for each distinct name, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(row)
    return [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]


def _layer_pre_forward_hook(module, args, kwargs, adapter_names: list[str], layer_name: str):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() > 0 and len(x) != len(adapter_names):
        raise ValueError(
            f"layer {layer_name!r}: adapter_names has {len(adapter_names)} entries but the batch has {len(x)} rows; "
            "valid: one adapter name (or '__base__') per row of the batch"
        )
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _row_wise_forward(wrapper: ModulesToSaveWrapper, x: torch.Tensor, *args: Any, adapter_names: list[str],
                      **kwargs: Any) -> torch.Tensor:
    """peft's ``_mixed_batch_forward`` for row-independent modules it does not list (layer norms); a row
    whose adapter has no trained copy of the module runs the original, as ``__base__`` does."""
    result = None
    for name, rows in row_groups(adapter_names, x.device):
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        out = module(x[rows], *args, **kwargs)
        if result is None:
            result = out.new_empty((len(x),) + tuple(out.shape[1:]))
        result[rows] = out
    return result


class MixedBatchMixin:
    """For ``BaseTuner`` subclasses whose layers accept an ``adapter_names`` keyword (one name per row)."""

    _batch_adapter_names: Optional[list[str]] = None

    def _check_mixed_batch(self, adapter_names) -> list[str]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names={adapter_names!r} is invalid; valid: a list of adapter names, "
                            "one per row of the batch ('__base__' for no adapter)")
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode: mixed-adapter batches "
                             "are for inference; call model.eval() first")
        layers = [(key, m) for key, m in self.model.named_modules() if isinstance(m, self.tuner_layer_cls)]
        loaded = set()
        for _, layer in layers:
            loaded.update(layer._all_available_adapter_names())
        unknown = sorted({n for n in adapter_names if n != BASE} - loaded)
        if unknown:
            raise ValueError(f"adapter_names names adapter(s) {unknown} that are not loaded; loaded adapters: "
                             f"{sorted(loaded)} (or '__base__' for rows without an adapter)")
        merged = next(((key, layer) for key, layer in layers if layer.merged), None)
        if merged is not None:
            raise ValueError(f"Cannot pass `adapter_names` when adapters are merged (layer {merged[0]!r} holds "
                             f"{merged[1].merged_adapters}): a row could not be run without them; call "
                             "unmerge_adapter() first")
        return list(adapter_names)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        adapter_names = self._check_mixed_batch(adapter_names)
        num_beams = kwargs.get("num_beams")
        original_names = adapter_names
        if isinstance(num_beams, int) and num_beams > 1:
            # generate() repeats each input num_beams times (as peft's LoRA handles it)
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        handles = []
        patched = []
        try:
            self._register_mixed_hooks(self.model, adapter_names, handles, patched)
            encoder = _get_encoder(self.model)
            if encoder is not None and adapter_names is not original_names:
                # the encoder sees the original inputs: a second hook overrides the repeated names
                self._register_mixed_hooks(encoder, original_names, handles, patched)
            self._batch_adapter_names = sorted(set(adapter_names) - {BASE})
            yield
        finally:
            self._batch_adapter_names = None
            for handle in handles:
                handle.remove()
            for wrapper in patched:
                wrapper.__dict__.pop("_mixed_batch_forward", None)

    def _register_mixed_hooks(self, root: torch.nn.Module, adapter_names: list[str], handles: list, patched: list):
        for key, module in root.named_modules():
            if isinstance(module, BaseTunerLayer):
                hook = partial(_layer_pre_forward_hook, adapter_names=adapter_names, layer_name=key)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                if isinstance(module, ModulesToSaveWrapper) and not isinstance(module.original_module,
                                                                              _PEFT_MIXED_MODULES):
                    module.__dict__["_mixed_batch_forward"] = partial(_row_wise_forward, module)
                    patched.append(module)
            else:
                continue
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
