"""What each parameter *is*, declared by the module that owns it.

The optimizer routing rule (Muon for hidden matrices, AdamW for the rest) and the doctor's grouping both
read these roles, so no code guesses from parameter names or shapes. A module class registers the role of
each of its own parameters; subclasses inherit the registration unless they register their own. A model
parameter whose owner registered nothing is an error at optimizer-build time, never a silent default. The role
names themselves (``ROLES``) are config's vocabulary (``optim.muon_roles``), defined in moe_arch/config.py.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from moe_arch.config import ROLES

_REGISTRY: dict[type, dict[str, str]] = {}


def register_roles(roles: dict[str, str]):
    """Class decorator: ``@register_roles({"weight": "norm"})``."""
    for r in roles.values():
        if r not in ROLES:
            raise ValueError(f"unknown parameter role {r!r}; known: {sorted(ROLES)}")

    def deco(cls):
        _REGISTRY[cls] = dict(roles)
        return cls

    return deco


# torch's own building blocks, as this project uses them.
register_roles({"weight": "hidden_matrix", "bias": "bias"})(nn.Linear)
register_roles({"weight": "embedding"})(nn.Embedding)
register_roles({"weight": "conv", "bias": "bias"})(nn.Conv1d)


class OutputHead(nn.Linear):
    """A linear map to the vocabulary (the LM head and the multi-token prediction heads)."""


class RouterLinear(nn.Linear):
    """A routing projection (MoE expert router, MoD token router)."""


register_roles({"weight": "output_head", "bias": "bias"})(OutputHead)
register_roles({"weight": "router", "bias": "bias"})(RouterLinear)


def role_of(module: nn.Module, param_name: str) -> str | None:
    for klass in type(module).__mro__:
        table = _REGISTRY.get(klass)
        if table is not None:
            return table.get(param_name)
    return None


def named_parameter_roles(model: nn.Module) -> Iterator[tuple[str, torch.nn.Parameter, str]]:
    """(full name, parameter, role) for every parameter; raises if one has no registered role."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights appear once, under their first owner
                continue
            seen.add(id(p))
            role = role_of(module, pname)
            full = f"{mod_name}.{pname}" if mod_name else pname
            if role is None:
                raise TypeError(
                    f"parameter {full!r} of {type(module).__name__} has no registered role; decorate the class with "
                    f"@register_roles({{{pname!r}: ROLE}}) using one of {sorted(ROLES)}"
                )
            yield full, p, role
