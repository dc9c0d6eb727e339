"""Parameters read without calling their module, under megatron-core's overlapped param gather.

With ``--use-distributed-optimizer --overlap-param-gather`` megatron-core's DDP all-gathers
the updated parameters asynchronously and waits for a module's own parameters in that
module's forward pre-hook. Code that hands a module's parameters to a fused kernel
without calling the module (a norm's weight inside the compiled bias-dropout-add) would
read them before the all-gather lands, and a bucket that only such parameters fill would
never be waited for. :func:`gathered` runs the module's pre-hooks first.
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
