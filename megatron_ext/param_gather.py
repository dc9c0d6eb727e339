"""Parameters read without calling their module, under megatron-core's overlapped param gather.

With ``--use-distributed-optimizer --overlap-param-gather`` megatron-core's DDP all-gathers
the updated parameters asynchronously and waits for a module's own parameters in that
module's forward pre-hook. Code that hands a module's parameters to a fused kernel
without calling the module (a norm's weight inside the compiled bias-dropout-add) would
read them before the all-gather lands, and a bucket that only such parameters fill would
never be waited for. :func:`gathered` runs the module's pre-hooks first.

The same DDP fills its buckets in the reverse order of ``model.parameters()`` and starts a
bucket's all-gather when the forward reaches the one before it, so a submodule registered
out of forward order loses that overlap (megatron-core warns that "the next bucket's
parameter all-gather operation has already been dispatched"): :func:`register_after`
moves a submodule added after its parent was built to where the forward reaches it.
"""

from __future__ import annotations

from typing import TypeVar

import torch

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def gathered(module: ModuleT) -> ModuleT:
    """``module``, its parameters all-gathered: its forward pre-hooks run with no input.

    A no-op without pre-hooks (the CPU path, DDP without ``--overlap-param-gather``).
    """
    for key, hook in list(module._forward_pre_hooks.items()):
        if key not in module._forward_pre_hooks_with_kwargs:
            hook(module, ())
    return module


def register_after(parent: torch.nn.Module, name: str, anchor: str) -> None:
    """Move ``parent``'s submodule ``name`` to just after ``anchor`` in its registration order.

    Only the order of ``parent.named_children()`` (and so of its parameters) changes; the
    names, and with them the state-dict keys, stay. ``name`` may be unset (``None``).
    """
    if getattr(parent, name) is None:
        return
    children = parent._modules
    if anchor not in children:
        raise KeyError(f"{type(parent).__name__} has no submodule {anchor!r} to register {name!r} after")
    moved = children.pop(name)
    reordered = []
    for key, child in children.items():
        reordered.append((key, child))
        if key == anchor:
            reordered.append((name, moved))
    children.clear()
    children.update(reordered)
