"""pretrain_gpt.py as earlier versions of megatron-ext ran it.

``emulated_cuda.py THIS.py {reordered,unrecorded,unfused} <pretrain_gpt flags>``:
``reordered`` registers NormFormer's norms in the order used before the methods' modules
were registered in forward order (a code change between saving and loading);
``unrecorded`` also saves no bucket order with 'dp_reshardable' state, as that code did
not; ``unfused`` runs megatron-core's torch AdamW as megatron-core builds it (foreach on a
GPU, ``step`` on the host), as before 2026-12-07. :func:`former_registration_order` is the
first change alone, for in-process tests.
"""

import contextlib
import sys
from typing import Iterator
from unittest import mock

import pretrain_gpt
from megatron_ext import layer, normformer
from megatron_ext.training import checkpointing, torch_adam


@contextlib.contextmanager
def former_registration_order() -> Iterator[None]:
    """NormFormer's norms registered after the modules they follow, as megatron-ext did before."""
    with mock.patch.object(layer, "register_after", lambda *unused: None), \
            mock.patch.object(normformer, "register_after", lambda *unused: None):
        yield


def main(mode: str, flags: list[str]) -> int:
    with contextlib.ExitStack() as patches:
        if mode == "unfused":
            patches.enter_context(mock.patch.object(torch_adam, "fuse", lambda optimizer: 0))
        else:
            patches.enter_context(former_registration_order())
        if mode == "unrecorded":
            patches.enter_context(mock.patch.object(checkpointing, "_bucket_order", lambda *unused: {}))
        return pretrain_gpt.main(flags + ["--device", "cuda"])


if __name__ == "__main__":  # not again in the checkpoint writer's spawned process
    sys.exit(main(sys.argv[1], sys.argv[2:]))
