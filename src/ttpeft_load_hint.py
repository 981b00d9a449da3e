"""Explains how to load a ttpeft adapter in a Python process that never imported ttpeft.

peft resolves ``adapter_config.json``'s ``peft_type`` in a plain dict, so an adapter saved by a
ttpeft method fails there with a bare ``KeyError: 'TTLORA'`` unless ``import ttpeft`` ran first.
``ttpeft_load_hint.pth`` imports this module at interpreter start-up. It imports nothing heavy:
it waits until ``peft.mapping`` is imported and then swaps that dict for one whose missing-key
error names the fix.
"""

from __future__ import annotations

import enum
import importlib.abc
import sys

# peft_type strings of the methods ttpeft registers (see ttpeft.registration).
TTPEFT_PEFT_TYPES = frozenset({"TTLORA", "LORETTA_REP", "LORETTA_ADP"})


class TtpeftNotImportedError(KeyError):
    """A ttpeft adapter was looked up in peft before ``import ttpeft`` registered it."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0])


def missing_method_message(peft_type: str) -> str:
    return (
        f"peft_type {peft_type!r} is a ttpeft method that is not registered with peft in this process: "
        f"run `import ttpeft` before loading the adapter (it registers {peft_type.lower()!r} with peft)."
    )


class HintingPeftTypeMapping(dict):
    """peft's peft_type -> config class mapping, with a helpful error for ttpeft's methods."""

    def __missing__(self, key):
        name = key.value if isinstance(key, enum.Enum) else key
        if isinstance(name, str) and name.upper() in TTPEFT_PEFT_TYPES:
            raise TtpeftNotImportedError(missing_method_message(name.upper()))
        raise KeyError(key)


def install_into(mapping_module) -> None:
    current = mapping_module.PEFT_TYPE_TO_CONFIG_MAPPING
    if not isinstance(current, HintingPeftTypeMapping):
        mapping_module.PEFT_TYPE_TO_CONFIG_MAPPING = HintingPeftTypeMapping(current)


class _PeftMappingFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``peft.mapping`` so the hint is installed right after it executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft.mapping":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        original_exec_module = loader.exec_module

        def exec_module(module):
            original_exec_module(module)
            install_into(module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    mapping_module = sys.modules.get("peft.mapping")
    if mapping_module is not None:
        install_into(mapping_module)
    elif not any(isinstance(f, _PeftMappingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftMappingFinder())


try:
    install()
except Exception:  # never break interpreter start-up over a hint
    pass
