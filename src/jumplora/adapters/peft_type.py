"""Adds ``JUMPLORA`` to PEFT's ``PeftType`` enum.

``peft.register_peft_method`` only accepts names that ``PeftType`` already lists, and the enum is
closed. We add one member the way ``Enum`` builds its own, so ``PeftType("JUMPLORA")`` resolves when
``PeftConfig.from_pretrained`` reads a saved ``adapter_config.json``.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType


def _extend_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


JUMPLORA: PeftType = _extend_peft_type("JUMPLORA")
