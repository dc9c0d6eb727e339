"""The train / eval loop: ProRes steps, logging, evaluation, checkpoints, signals,
non-finite step skipping and loss-spike events.

Exit codes: 0 done, :data:`EXIT_SIGNAL_SAVED` (42) after saving on SIGTERM/SIGUSR1 (a
SLURM script requeues on it), :data:`EXIT_NONFINITE` (3) after too many consecutive
non-finite steps.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_ext import prores
from megatron_ext.training.checkpointing import TrainingState, save_checkpoint
from megatron_ext.training.metrics import GpuMonitor, MetricsWriter, format_log_line, method_scalars
from megatron_ext.training.optimization import Engine, StepResult

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_SIGNAL_SAVED = 42
SAVE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MAX_PERPLEXITY_EXPONENT = 20.0


class SaveSignal:
    """Records SIGTERM / SIGUSR1 so the loop can save at the next iteration boundary."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "SaveSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SAVE_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_rank(self, device: torch.device) -> bool:
        """Whether any rank got a signal (all ranks must save together)."""
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class SpikeDetector:
    """Flags a loss above the running mean by ``num_std`` standard deviations.

    Statistics cover the last ``window`` finite losses; at least ``window // 4`` (and 8)
    are needed before anything is flagged.
    """

    window: int
    num_std: float
    history: deque[float] = field(default_factory=deque)

    def update(self, loss: float) -> Optional[tuple[float, float]]:
        """Add ``loss``; return (mean, std) of the previous losses if it is a spike."""
        spike = None
        if len(self.history) >= max(8, self.window // 4):
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (len(self.history) - 1))
            if loss > mean + self.num_std * std:
                spike = (mean, std)
        self.history.append(loss)
        if len(self.history) > self.window:
            self.history.popleft()
        return spike


@dataclass
class Interval:
    """Sums over the iterations since the last log line."""

    losses: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    iterations: int = 0

    def reset(self) -> None:
        self.losses.clear()
        self.iterations = 0
        self.start = time.perf_counter()


class Trainer:
    """Runs iterations of an engine (:class:`CpuEngine` or :class:`GpuEngine`)."""

    def __init__(self, args: argparse.Namespace, engine: Engine, state: TrainingState, writer: MetricsWriter,
                 train_batches: Iterator, valid_batches: Optional[Callable[[], Iterator]], methods: dict,
                 flops_per_iteration: float, device: torch.device, gpu_monitor: Optional[GpuMonitor] = None) -> None:
        self.args = args
        self.engine = engine
        self.state = state
        self.writer = writer
        self.train_batches = train_batches
        self.valid_batches = valid_batches
        self.methods = methods
        self.flops_per_iteration = flops_per_iteration
        self.device = device
        self.gpu_monitor = gpu_monitor
        self.spikes = SpikeDetector(args.spike_window, args.spike_std)
        self.interval = Interval()
        self.consecutive_skips = 0

    @property
    def model_chunks(self) -> list[torch.nn.Module]:
        """The engine's (possibly wrapped) model chunks."""
        return self.engine.model_chunks

    def train(self) -> int:
        """Iterate up to ``--train-iters``; returns the process exit code."""
        args = self.args
        last_evaluated = None
        last_saved = self.state.iteration if self._resumed_in_save_dir() else None
        if self.state.iteration >= args.train_iters:
            logger.info("nothing to train: the checkpoint is at iteration %d, --train-iters %d",
                        self.state.iteration, args.train_iters)
        if self.valid_batches is not None and self.state.iteration == 0:
            self.evaluate()  # the starting point of the validation curve
            last_evaluated = 0
        with SaveSignal() as save_signal:
            while self.state.iteration < args.train_iters:
                prores.set_prores_step(self.model_chunks, self.engine.completed_updates)
                log_now = (self.state.iteration + 1) % args.log_interval == 0
                result = self.engine.train_step(self.train_batches, layer_norms=log_now)
                self.state.iteration += 1
                self.state.consumed_train_samples += args.global_batch_size
                if not self._account(result):
                    return EXIT_NONFINITE
                if log_now:
                    self._log(result)
                if self.valid_batches is not None and self.state.iteration % args.eval_interval == 0:
                    self.evaluate()
                    last_evaluated = self.state.iteration
                if args.save and args.save_interval and self.state.iteration % args.save_interval == 0:
                    self.save()
                    last_saved = self.state.iteration
                if save_signal.any_rank(self.device):
                    if last_saved != self.state.iteration:
                        self.save()
                    logger.warning("signal received: saved checkpoint at iteration %d; exiting with code %d",
                                   self.state.iteration, EXIT_SIGNAL_SAVED)
                    return EXIT_SIGNAL_SAVED
        if self.valid_batches is not None and last_evaluated != self.state.iteration:
            self.evaluate()
        if args.save and last_saved != self.state.iteration:
            self.save()
        return EXIT_OK

    def _resumed_in_save_dir(self) -> bool:
        """Whether ``--save`` already holds this iteration's checkpoint: the one resumed from."""
        args = self.args
        return bool(self.state.iteration and args.load and args.save
                    and os.path.realpath(args.load) == os.path.realpath(args.save))

    def _account(self, result: StepResult) -> bool:
        """Count skips and spikes; False when the run must stop."""
        it = self.state.iteration
        self.interval.iterations += 1
        if result.loss_scale_overflow:  # counted as skipped, as Megatron-LM does, but not a failure
            self.state.skipped_iterations += 1
            logger.info("iteration %d: fp16 gradients overflowed; update skipped, loss scale lowered", it)
            return True
        if result.skipped:
            self.state.skipped_iterations += 1
            self.consecutive_skips += 1
            logger.warning("iteration %d: non-finite lm loss (%s) or grad norm (%s); update skipped "
                           "(%d consecutive)", it, result.loss, result.grad_norm, self.consecutive_skips)
            self.writer.write({"iteration": it, "event": "skipped_step", "lm_loss": result.loss,
                               "grad_norm": result.grad_norm})
            if self.consecutive_skips >= self.args.max_consecutive_skips:
                logger.error("stopping: %d consecutive iterations with a non-finite loss or grad norm "
                             "(--max-consecutive-skips %d) at iteration %d", self.consecutive_skips,
                             self.args.max_consecutive_skips, it)
                return False
            return True
        self.consecutive_skips = 0
        self.interval.losses.append(result.loss)
        spike = self.spikes.update(result.loss)
        if spike is not None:
            mean, std = spike
            logger.warning("iteration %d: loss spike: lm loss %.4f > running mean %.4f + %.1f x std %.4f",
                           it, result.loss, mean, self.args.spike_std, std)
            self.writer.write({"iteration": it, "event": "loss_spike", "lm_loss": result.loss,
                               "running_mean": mean, "running_std": std})
        return True

    def _log(self, result: StepResult) -> None:
        """Megatron-LM's log line and a metrics record for the interval ending at ``result``."""
        args = self.args
        elapsed = time.perf_counter() - self.interval.start
        per_iteration = elapsed / max(self.interval.iterations, 1)
        losses = self.interval.losses
        record = {
            "iteration": self.state.iteration,
            "consumed_samples": self.state.consumed_train_samples,
            "consumed_tokens": self.state.consumed_train_samples * args.seq_length,
            "iteration_time_ms": per_iteration * 1000.0,
            "lr": result.lr,
            "global_batch_size": args.global_batch_size,
            "lm_loss": sum(losses) / len(losses) if losses else float("nan"),
            "grad_norm": result.grad_norm,
            "skipped_iterations": self.state.skipped_iterations,
            "tokens_per_s": args.global_batch_size * args.seq_length / per_iteration,
        }
        if self.gpu_monitor is not None:
            tflops = self.flops_per_iteration / per_iteration / dist.get_world_size() / 1e12
            record.update(tflops_per_gpu=tflops, mfu=100.0 * tflops / args.gpu_peak_tflops)
            record.update(self.gpu_monitor.read())
        logger.info(format_log_line(record, args.train_iters))
        record.update(method_scalars(self.model_chunks))
        record.update({f"grad_norm/layer_{l:03d}": v for l, v in result.layer_grad_norms.items()})
        self.writer.write(record)
        self.interval.reset()

    def evaluate(self) -> float:
        """Validation loss and perplexity over ``--eval-iters`` batches, with ProRes' scalars of
        the updates done so far (a resumed run may evaluate before its first step sets them)."""
        prores.set_prores_step(self.model_chunks, self.engine.completed_updates)
        start = time.perf_counter()
        loss = self.engine.evaluate(self.valid_batches(), self.args.eval_iters)
        self.interval.start += time.perf_counter() - start  # iteration times exclude evaluation
        ppl = math.exp(min(loss, MAX_PERPLEXITY_EXPONENT))
        logger.info(" validation loss at iteration %d | lm loss value: %.6E | lm loss PPL: %.6E |",
                    self.state.iteration, loss, ppl)
        self.writer.write({
            "iteration": self.state.iteration,
            "consumed_tokens": self.state.consumed_train_samples * self.args.seq_length,
            "val_loss": loss,
            "val_ppl": ppl,
        })
        return loss

    def save(self) -> None:
        """A checkpoint of the current iteration under ``--save``."""
        save_checkpoint(self.args.save, self.state, self.engine, self.model_chunks, self.args, self.methods)
