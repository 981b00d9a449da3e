"""Registering ttpeft's methods with peft (idempotent)."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from .enum_extension import extend_enum


def ensure_peft_type(name: str) -> PeftType:
    """The ``PeftType`` member for a method name such as ``"ttlora"``, added when missing."""
    return extend_enum(PeftType, name.upper(), name.upper())


def register_method(name: str, config_cls, model_cls, prefix: str) -> None:
    """Register a tuner with peft once; a second call with the same classes does nothing."""
    peft_type = ensure_peft_type(name)
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is not None:
        if registered is config_cls and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
            return
        raise ValueError(
            f"peft already has a method {name!r} registered by {registered.__module__}.{registered.__qualname__}; "
            f"ttpeft cannot register its own {config_cls.__qualname__} under the same name"
        )
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
