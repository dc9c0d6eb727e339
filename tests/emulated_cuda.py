"""Run the GPU path of pretrain_gpt.py on a CPU, to test it where no GPU is lent.

``python tests/emulated_cuda.py <pretrain_gpt flags>`` (or under ``torchrun``) runs
``pretrain_gpt.main`` with ``--device cuda`` while CUDA is emulated;
``python tests/emulated_cuda.py SCRIPT.py <its flags>`` runs another script that way (a
dry run of the GPU benchmarks: no timings, and no memory figures, come out of it):

- ``torch.cuda``'s device, stream, event, RNG and memory functions answer as one idle
  device whose RNG is the CPU generator (megatron's CUDA RNG tracker then forks CPU
  states, harmless with dropout 0);
- a ``TorchFunctionMode`` places every tensor asked for on ``cuda`` on the CPU, makes
  ``Tensor.cuda`` the identity and reports CPU tensors as CUDA ones (``is_cuda``,
  ``type()``), which megatron-core's mixed-precision optimizer checks;
- process groups are gloo: NCCL's backend name and options are dropped.

What this exercises is everything above the kernels: megatron-core's DDP and its
buckets, ``get_megatron_optimizer`` (distributed optimizer included), the pipeline
schedules with their p2p communication, ``finalize_model_grads``, Float16Module and
distributed checkpointing, with the driver's GPU engine around them, and the fused
kernels through torch.compile's CPU backend. What it cannot: CUDA kernels (and their
compilation for the GPU), NCCL, Transformer Engine, streams and memory, speed.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from unittest import mock

import torch
import torch.distributed as dist
import torch.utils._triton as torch_triton
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
                    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
                    torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor"}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaTensorsOnCpu(TorchFunctionMode):
    """Tensors requested on ``cuda`` are made on the CPU and answer as CUDA tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.is_cuda.__get__:
            return True
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _Stream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_Event":
        return event or _Event()

    def synchronize(self) -> None:
        pass


class _Event:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _gloo_init_process_group(original):
    def init(backend: Optional[str] = None, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("device_id", None)
        return original("gloo", *args, **kwargs)
    return init


def _gloo_new_group(original):
    def new_group(*args: Any, **kwargs: Any):
        kwargs.pop("pg_options", None)
        if kwargs.get("backend") == "nccl":
            kwargs.pop("backend")
        return original(*args, **kwargs)
    return new_group


# A new function for every patched name: dynamo files each torch function under one rule
# and rejects one object found under two names with different rules.
def _returning(value: Any):
    def constant(*args: Any, **kwargs: Any) -> Any:
        return value
    return constant


def _cpu_seed():
    def manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))
    return manual_seed


def _cpu_get_rng_state():
    def get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()
    return get_rng_state


def _cpu_set_rng_state():
    def set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)
    return set_rng_state


def _isend_of_a_copy(original):
    """NCCL reads a send buffer in stream order; gloo's background thread reads it whenever
    it gets to it, after megatron's overlapped pipeline schedule may have reused it."""
    def isend(tensor: torch.Tensor, *args: Any, **kwargs: Any):
        return original(tensor.clone(), *args, **kwargs)
    return isend


@contextlib.contextmanager
def _without_log_record(logger_name: str, message: str) -> Iterator[None]:
    """Drop ``logger_name``'s records whose message is ``message`` for the duration of the block."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return record.getMessage() != message

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


_RNG_NOTICE = "CPU RNG state changed within GPU RNG context"
EMULATED_MEMORY = 80 * 2**30  # bytes free and in all, as an idle 80 GB GPU


def _register_inductor_patterns_for_the_cpu() -> None:
    """Register inductor's pattern-matcher patterns now, for the CPU.

    torch 2.7 and earlier register them once, on CUDA tensors whenever CUDA answers
    available, which under the emulation calls the driver; later releases take the
    compiled graph's device (a parameter of ``lazy_init``) and need nothing here.
    """
    from torch._inductor.fx_passes import joint_graph

    if "input_device" not in inspect.signature(joint_graph.lazy_init).parameters:
        joint_graph.lazy_init()


@contextlib.contextmanager
def emulated_cuda() -> Iterator[None]:
    """One emulated CUDA device for the duration of the block (see the module docstring)."""
    from megatron.core.tensor_parallel import random as megatron_random

    _register_inductor_patterns_for_the_cpu()
    patches = {
        "is_available": _returning(True), "device_count": _returning(1), "current_device": _returning(0),
        "set_device": _returning(None), "synchronize": _returning(None), "empty_cache": _returning(None),
        "Stream": _Stream, "Event": _Event, "stream": lambda stream=None: contextlib.nullcontext(),
        "current_stream": lambda device=None: _Stream(), "default_stream": lambda device=None: _Stream(),
        "manual_seed": _cpu_seed(), "manual_seed_all": _cpu_seed(),
        "get_rng_state": _cpu_get_rng_state(), "set_rng_state": _cpu_set_rng_state(),
        "memory_allocated": _returning(0), "max_memory_allocated": _returning(0), "memory_reserved": _returning(0),
        "max_memory_reserved": _returning(0), "reset_peak_memory_stats": _returning(None),
        "mem_get_info": _returning((EMULATED_MEMORY, EMULATED_MEMORY)),
        "get_device_name": _returning("emulated CUDA (CPU)"), "is_bf16_supported": _returning(True),
        # Asked by torch's optimizers of CUDA tensors; a CUDA build of torch would ask the driver.
        "is_current_stream_capturing": _returning(False),
    }
    with contextlib.ExitStack() as stack:
        for name, value in patches.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value, create=True))
        stack.enter_context(mock.patch.object(torch.cuda.random, "get_rng_state", _cpu_get_rng_state()))
        # torch.compile tracks the accelerator's current stream and asks triton's GPU support;
        # on a CUDA build of torch (as on the GPU machine, with triton) both would ask the
        # driver. As on a CPU build without triton: no accelerator, no triton.
        stack.enter_context(mock.patch.object(torch.accelerator, "is_available", _returning(False)))
        stack.enter_context(mock.patch.object(torch_triton, "has_triton_package", _returning(False)))
        stack.enter_context(mock.patch.object(megatron_random, "_get_cuda_rng_state", _cpu_get_rng_state()))
        stack.enter_context(mock.patch.object(megatron_random, "_set_cuda_rng_state", _cpu_set_rng_state()))
        stack.enter_context(mock.patch.object(dist, "init_process_group", _gloo_init_process_group(dist.init_process_group)))
        stack.enter_context(mock.patch.object(dist, "new_group", _gloo_new_group(dist.new_group)))
        isend = _isend_of_a_copy(dist.isend)  # also where P2POp checks its op's identity
        stack.enter_context(mock.patch.object(dist, "isend", isend))
        stack.enter_context(mock.patch.object(dist.distributed_c10d, "isend", isend))
        # The emulated GPU's RNG is the CPU generator: megatron's notice of the two mixing
        # (a warning in one module, a log record in another) says nothing here.
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=_RNG_NOTICE)
        stack.enter_context(_without_log_record(megatron_random.__name__, _RNG_NOTICE))
        stack.enter_context(CudaTensorsOnCpu())
        yield


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``pretrain_gpt.main(argv + ['--device', 'cuda'])`` under :func:`emulated_cuda`, or
    the script ``argv[0]`` (a ``.py`` path) as ``__main__`` with ``argv[1:]``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import pretrain_gpt
    # Imported before the patches: their module-level torch lookups must see the real torch.cuda.
    from megatron_ext.training import checkpointing, engine_gpu, loop, metrics, setup  # noqa: F401

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith(".py"):
        # The patches by their module's own name: the script takes over ``__main__``, where
        # dynamo's guards would look for them.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from emulated_cuda import emulated_cuda as emulation

        sys.argv = argv
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        with emulation():
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    with emulated_cuda():
        return pretrain_gpt.main(argv + ["--device", "cuda"])


if __name__ == "__main__":
    sys.exit(main())
