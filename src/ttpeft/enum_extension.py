"""Adding a member to a closed ``enum.Enum`` at run time (CPython 3.10 to 3.13).

peft only registers methods whose name is a member of its ``PeftType`` enum, and enums are closed
once created. This module has no third-party imports so it can be tested on every supported Python.
"""

from __future__ import annotations

import enum


def extend_enum(enum_cls: type[enum.Enum], name: str, value) -> enum.Enum:
    """Add ``name = value`` to ``enum_cls`` and return the member; idempotent for the same pair."""
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}")
        return existing
    if value in enum_cls._value2member_map_:
        raise ValueError(f"{enum_cls.__name__} already has value {value!r} under another name")
    base = enum_cls._member_type_
    member = object.__new__(enum_cls) if base is object else base.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    # type.__setattr__ bypasses EnumType's guard against assigning members.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member
