"""The iteration loop every training script shares, and the protocol a stage implements.

A training script supplies a :class:`Stage` (what one iteration computes, which optimizers
exist, the official checkpoint layout) and calls :func:`run_stage`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datasets.build import stream
from datasets.labels import class_names
from datasets.loader import to_device_image, workers_per_rank
from engine.common import LOG, NonFiniteLossError, RunError, per_rank, progress
from engine.launch import stop_run
from engine.network import build_network, prepare_for_training, unwrap
from engine.optim import autocast, grad_scaler, set_lr, sgd_for
from engine.state import (
    LATEST,
    STATE_FORMAT,
    STATE_FORMAT_V1,
    local_state,
    plain_args,
    resolve_resume_from,
    restore_local_state,
)
from engine.validation import EvalSettings, evaluate, sample_figure, val_loader
from model import DecoupleNet
from utils import distributed as du
from utils import faults, signals
from utils.checkpoint import CheckpointError, atomic_save, safe_load
from utils.metrics import format_iou_table

METRICS = "metrics.jsonl"

Losses = dict[str, Tensor]  # a pass's losses by name; its "total" is what is back-propagated
HandedOn = TypeVar("HandedOn")  # what a pass hands on to later passes or to the stage
# What every pass of a PassObjective returns: its losses and what it hands on (None: nothing).
PassResult = tuple[Losses, HandedOn]
Objective = TypeVar("Objective", bound="PassObjective")


class Stage:
    """What differs between training scripts. Subclasses set the attributes in :meth:`build`.

    Attributes:
        net: the :class:`DecoupleNet` (unwrapped).
        objective: the stage's :class:`PassObjective` (unwrapped); :meth:`step` runs its passes.
        model: the module run each iteration: ``objective``, DDP-wrapped when distributed.
        optimizers: name -> (optimizer, base lr); the first is the SGD of the network.
        extra_modules: name -> module the training state holds besides the network (e.g. the
            discriminators of phase 1).
        official_phase: 1 or 2, the checkpoint layout written for best/final checkpoints.

    The batches come from :meth:`batches` (one infinite iterator from a given iteration on), one
    iteration's passes from :meth:`step`.
    """

    name = "stage"
    official_phase = 1
    checkpoint_prefix = "GTA5"
    # Logged values that tensorboard gets under their own names, as the original writes them
    # (every 10 iterations); the other logged values go under train/<name>.
    original_scalars: tuple[str, ...] = ("loss_seg",)
    pseudo_monitor: Any = None  # stages.pseudo_quality.PseudoLabelMonitor when target ground truth exists

    def __init__(self, args: Any, env: du.DistEnv) -> None:
        self.args = args
        self.env = env
        self.net: DecoupleNet
        self.objective: PassObjective
        self.model: nn.Module
        self.optimizers: dict[str, tuple[torch.optim.Optimizer, float]] = {}
        self.extra_modules: dict[str, nn.Module] = {}
        self.resuming = False  # set by run_stage when a training state will be restored
        self.batch = per_rank(args.batch_size, env, "--batch-size")  # this rank's share of the batch

    def build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def batches(self, start_iter: int) -> Iterator[tuple]:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, it: int, batch: tuple, forward_backward: ForwardBackward) -> None:  # pragma: no cover
        """One micro-batch of iteration ``it``: the passes of :attr:`objective`, in order, each
        run by ``forward_backward(objective.<pass>, *inputs)``, which back-propagates the pass's
        ``total`` before the next pass starts (so only one pass's activations are alive at a
        time) and returns what the pass hands on (detached). The last pass is called with
        ``last=True``."""
        raise NotImplementedError

    def build_net(self, decoupled: bool, aux: bool,
                  checkpoint_hook: Callable[[dict], None] | None = None,
                  after_backbone: Callable[[], object] | None = None) -> DecoupleNet:
        """The stage's :class:`DecoupleNet`, weighted from ``--resume`` or ImageNet
        (:func:`engine.network.build_network`; neither is read when a training state will be restored)."""
        return build_network(self.args, decoupled=decoupled, aux=aux, skip_weights=self.resuming,
                             checkpoint_hook=checkpoint_hook, after_backbone=after_backbone)

    def train_objective(self, objective: Objective, find_unused_parameters: bool = False) -> Objective:
        """Make ``objective`` (a :class:`PassObjective` holding ``net`` and the stage's losses) the
        module trained each iteration: on the device and DDP-wrapped when distributed
        (:func:`engine.network.prepare_for_training`), as ``self.model``. Sets ``self.objective``
        (unwrapped), ``self.net`` and ``optimizers["model"]``, the SGD of the network. Returns
        the unwrapped objective."""
        args, env = self.args, self.env
        self.model = prepare_for_training(objective, env, args, find_unused_parameters=find_unused_parameters)
        inner: Objective = unwrap(self.model)
        self.objective = inner
        self.net = inner.net
        self.optimizers = {"model": (sgd_for(self.net, args, env.device), args.learning_rate)}
        return inner

    def official_state(self) -> dict:
        """What best/final checkpoints hold (the official layout of ``official_phase``)."""
        return self.net.official_state(phase=self.official_phase)

    def tensorboard_extra(self, writer: Any, it: int) -> None:
        """Per-stage scalars (thresholds, pseudo-label coverage)."""

    def extra_state(self) -> dict:
        return {}

    def image(self, batch: dict, key: str = "img") -> Tensor:
        """A uint8 image batch on the training device as ``float / 255`` (channels_last on CUDA)."""
        dev = self.env.device
        return to_device_image(batch[key], dev, self.args.channels_last and dev.type == "cuda")

    def domain_batches(self, start_iter: int, *datasets) -> Iterator[tuple]:
        """Endless tuples with one batch of each dataset, from iteration ``start_iter`` on.

        The data workers of this rank are split between the datasets; every sample is a
        function of its key, so the batches do not depend on the number of workers.
        """
        args, env = self.args, self.env
        workers = max(0, workers_per_rank(args.num_workers, env) // len(datasets))
        streams = [stream(d, self.batch, env, args.random_seed, not args.noshuffle, start_iter * args.iter_size, workers)
                   for d in datasets]
        while True:
            yield tuple(next(s) for s in streams)

    def load_extra_state(self, state: dict) -> None:
        pass


class PassObjective(nn.Module):
    """The module a stage trains: the network and the stage's losses, with one method per pass
    of an iteration (phase 1: ``source``, ``target``, ``discriminators``). Each pass returns a
    :data:`PassResult`: its losses and what it hands on.

    A pass runs as ``model(objective.source, *inputs)``: through ``forward``, and so through the
    one DDP wrapper around this module, whose gradient hooks are armed only there
    (:class:`ForwardBackward` makes this call)."""

    def forward(self, objective_pass: Callable[..., PassResult[HandedOn]], *inputs: Any) -> PassResult[HandedOn]:
        """Run ``objective_pass``, a pass of this module (a bound method), on ``inputs``."""
        if not (isinstance(objective_pass, types.MethodType) and objective_pass.__self__ is self):
            raise ValueError(f"{objective_pass!r} is not a pass of this {type(self).__name__}")
        return objective_pass(*inputs)


class ForwardBackward:
    """Forward and backward of one pass: the callable :meth:`Stage.step` gets for a micro-batch.

    ``forward_backward(objective.source, x, y)`` runs the pass through the stage's model (the DDP
    wrapper's ``forward``) under ``--amp``'s autocast, back-propagates its ``total`` through the
    grad scaler, divided by ``--iter-size``, adds its losses to the iteration's sums, and returns
    what the pass hands on. ``last=True`` marks the micro-batch's last pass: DDP all-reduces the
    gradients only in the backward of the iteration's last pass (the last micro-batch's last);
    every other pass runs under ``no_sync``, its forward included, because DDP decides in the
    forward whether the following backward all-reduces.
    """

    def __init__(self, trainer: Trainer, it: int, loss_sums: dict[str, Tensor], final_micro_batch: bool) -> None:
        self.trainer = trainer
        self.it = it
        self.loss_sums = loss_sums  # shared by the iteration's micro-batches
        self.final_micro_batch = final_micro_batch
        self.finished = False  # the pass marked last has run

    def __call__(self, objective_pass: Callable[..., PassResult[HandedOn]], *inputs: Any,
                 last: bool = False) -> HandedOn:
        if self.finished:
            raise RuntimeError(f"{objective_pass.__name__}: a pass after the micro-batch's last one (last=True)")
        self.finished = last
        trainer, iter_size = self.trainer, self.trainer.args.iter_size
        with self.gradient_sync(last and self.final_micro_batch):
            with autocast(trainer.args, trainer.env.device):
                losses, handed_on = trainer.stage.model(objective_pass, *inputs)
            faults.at_iteration(self.it, losses)  # tests only: nothing unless $DECOUPLENET_FAULT asks
            trainer.scaler.scale(losses["total"] / iter_size).backward()
        for name, v in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0) + v.detach().float() / iter_size
        return handed_on

    def gradient_sync(self, sync: bool):
        """Context of one forward + backward: DDP all-reduces the gradients only when ``sync``;
        otherwise they accumulate locally (``no_sync``)."""
        model = self.trainer.stage.model
        if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def check_finished(self) -> None:
        """After :meth:`Stage.step`: its last pass was marked, else DDP would never all-reduce."""
        if not self.finished:
            raise RuntimeError("Stage.step must run its last pass with last=True (the pass whose backward "
                               "all-reduces the gradients under DDP)")


class Trainer:
    """The iteration loop shared by source-only, phase 1 and phase 2 training.

    A stop request (SIGUSR1 / SIGTERM, :mod:`utils.signals`) travels in the iteration's one
    all-reduce (:meth:`train_step`), so every rank learns in the same iteration that some rank
    was asked to stop; they finish it, write ``latest.pth`` and exit (:meth:`stop_after`).
    """

    # Benchmarks only (benchmarks/bench_stop_agreement.py): False leaves the stop flag out of the
    # iteration's all-reduce, so that its cost can be measured; stop requests are then ignored.
    agree_on_stop = True

    def __init__(self, stage: Stage, writer: Any, val_loader: DataLoader | None) -> None:
        self.stage = stage
        self.args = stage.args
        self.env = stage.env
        self.writer = writer
        self.val_loader = val_loader
        self.scaler = grad_scaler(self.args.amp, self.env.device)
        self.loss_scale: float | None = None  # fp16: the loss scale of the current iteration (host copy)
        self.skipped_steps = 0  # fp16: consecutive iterations whose optimizer steps the scaler skipped
        self.quality: dict[str, float | int | None] = {}  # the pseudo-label entries of the current iteration
        self.start_iter = 0
        self.best_miou = 0.0
        self.best_path: str | None = None
        self.stop_requested = False  # some rank was asked to stop (agreed in the last train_step)

    # ------------------------------------------------------------------ state
    def stage_modules(self) -> dict[str, nn.Module]:
        """The network and the stage's extra modules, by their names in the training state."""
        return {"model": self.stage.net, **self.stage.extra_modules}

    def training_state(self, next_iter: int) -> dict | None:
        """The full training state on rank 0 (``None`` on the other ranks); a collective.

        Everything DDP keeps equal over ranks (weights, optimizers, scaler, the averaged
        thresholds) is taken from rank 0; what each rank keeps for itself (:func:`local_state`)
        is gathered from every rank into ``ranks``. ``stage_state`` and ``rng`` repeat rank 0's.
        """
        ranks = du.gather_to_main(local_state(self.stage_modules(), self.stage.extra_state(), self.env.rank,
                                              self.env.device), self.env.device)
        if ranks is None:
            return None
        s = self.stage
        return {
            "format": STATE_FORMAT,
            "stage": s.name,
            "iteration": next_iter,
            "model": {k: v for k, v in s.net.state_dict().items()},
            "extra_modules": {k: m.state_dict() for k, m in s.extra_modules.items()},
            "optimizers": {k: opt.state_dict() for k, (opt, _) in s.optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "best_miou": self.best_miou,
            "best_path": self.best_path or "",
            "stage_state": ranks[0]["stage_state"],
            "rng": ranks[0]["rng"],
            "world_size": len(ranks),
            "ranks": ranks,
            "args": plain_args(self.args, self.env.world_size),
        }

    def restore(self, path: str) -> None:
        state = safe_load(path)
        if not isinstance(state, dict) or state.get("format") not in (STATE_FORMAT, STATE_FORMAT_V1):
            raise CheckpointError(f"{path}: not a training state written by this project (latest.pth)")
        s = self.stage
        if state["stage"] != s.name:
            raise CheckpointError(f"{path}: training state of stage {state['stage']!r}, not {s.name!r}")
        try:
            s.net.load_state_dict(state["model"])
            for k, m in s.extra_modules.items():
                m.load_state_dict(state["extra_modules"][k])
            for k, (opt, _) in s.optimizers.items():
                opt.load_state_dict(state["optimizers"][k])
            approximated = restore_local_state(state, s, self.stage_modules(), self.env)
            self.restore_scaler(state.get("scaler") or {}, path)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{path}: does not fit this network/options ({first})") from None
        self.start_iter = int(state["iteration"])
        self.best_miou = float(state["best_miou"])
        self.best_path = state["best_path"] or None
        if approximated and self.env.is_main:
            LOG.warning("%s: %s", path, approximated)
        LOG.info("resumed from %s at iteration %d (best mIoU so far %.4f)", path, self.start_iter,
                 self.best_miou)

    def restore_scaler(self, saved: dict, path: str) -> None:
        """The grad scaler's state, across ``--amp`` modes: a state written with ``--amp off`` /
        ``bf16`` or ``--cpu`` holds an empty scaler (a disabled ``GradScaler`` saves ``{}``, which an
        enabled one refuses to load), so an fp16 run resumed from it starts the loss scale afresh;
        an fp16 state resumed without fp16 has no use for it. Either way one line says so."""
        if saved and self.scaler.is_enabled():
            self.scaler.load_state_dict(saved)
        elif self.scaler.is_enabled():
            LOG.info("%s: no grad-scaler state (written without --amp fp16); the fp16 loss scale starts at %g",
                     path, self.scaler.get_scale())
        elif saved:
            LOG.info("%s: its fp16 grad-scaler state is not used with --amp %s", path, self.args.amp)

    @staticmethod
    def save_file(obj: Any, path: str) -> None:
        """``atomic_save``; a failed write (disk full, permissions) is a one-line error naming the file."""
        try:
            atomic_save(obj, path)
        except OSError as exc:
            raise RunError(f"{path}: cannot write checkpoint ({exc.strerror or exc})") from None

    def save_latest(self, next_iter: int) -> None:
        """Every rank's state of ``next_iter`` in one ``latest.pth``, written by rank 0 (all ranks call).

        One file renamed into place at once: a kill at any moment leaves either the complete
        state of this iteration (every rank's part) or the previous complete one.
        """
        state = self.training_state(next_iter)
        if state is not None:
            self.save_file(state, os.path.join(self.args.snapshot_dir, LATEST))

    def save_official(self, filename: str) -> str:
        path = os.path.join(self.args.snapshot_dir, filename)
        self.save_file(self.stage.official_state(), path)
        LOG.info("saved %s", path)
        return path

    # ------------------------------------------------------------------ validation
    def validate(self, it: int) -> dict[str, float]:
        """Validation after iteration ``it`` (all ranks call): the IoU table and ``loss_val`` in the
        log; ``miou_val`` and ``loss_val`` in tensorboard under the original's tags, at step ``it``,
        with our per-class IoU (``val_iou/<class>``) and sample figure (``val/sample``). Returns
        ``{"miou_val": ..., "loss_val": ...}``."""
        result = evaluate(self.stage.net, self.val_loader, self.env, EvalSettings.from_args(self.args))
        scores = {"miou_val": float(result.miou), "loss_val": float(result.loss)}
        if self.env.is_main:
            names = class_names(self.args.num_classes)
            LOG.info("iter %d validation: loss_val = %.5f\n%s", it, result.loss,
                     format_iou_table(result.iou, names, result.miou))
            fig = sample_figure(result.sample) if result.sample else None
            if fig is not None:
                import cv2

                cv2.imwrite(os.path.join(self.args.snapshot_dir, "val_sample.png"), fig[:, :, ::-1])
            if self.writer is not None:
                for tag, v in scores.items():  # the original's two validation scalars
                    self.writer.add_scalar(tag, v, it)
                for name, v in zip(names, result.iou):
                    self.writer.add_scalar(f"val_iou/{name}", float(v), it)
                if fig is not None:
                    self.writer.add_image("val/sample", fig, it, dataformats="HWC")
        return scores

    def maybe_save_best(self, it: int, miou: float) -> None:
        """Write the new best checkpoint first, then remove the previous one (never zero copies)."""
        if not self.env.is_main or miou <= self.best_miou:
            return
        old = self.best_path
        self.best_miou = miou
        self.best_path = self.save_official(f"{self.stage.checkpoint_prefix}_{it}_{miou}.pth")
        if old and old != self.best_path and os.path.exists(old):
            os.remove(old)

    # ------------------------------------------------------------------ the loop
    def append_metrics(self, it: int, logged: dict[str, float]) -> None:
        """One JSON line per iteration in ``<snapshot>/metrics.jsonl``: the losses at full precision
        (the log rounds them), and ``miou_val`` / ``loss_val`` after a validation. Appended, so a
        resumed run continues the same file."""
        path = os.path.join(self.args.snapshot_dir, METRICS)
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"iter": it, **logged}) + "\n")
        except OSError as exc:
            raise RunError(f"{path}: cannot append ({exc.strerror or exc})") from None

    def check_finite(self, values: Tensor, names: list[str], it: int) -> None:
        if self.scaler.is_enabled():  # fp16: the grad scaler skips such steps, as in the original
            return
        if not torch.isfinite(values).all():
            bad = [n for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"non-finite loss at iteration {it} ({', '.join(bad)}); stopping. The last good "
                f"training state is {os.path.join(self.args.snapshot_dir, LATEST)}"
            )

    def accumulate_gradients(self, it: int, batches: Iterator[tuple]) -> dict[str, Tensor]:
        """Forward and backward of one iteration's ``--iter-size`` micro-batches.

        Every micro-batch runs the stage's passes in order (:meth:`Stage.step`; phase 1: source,
        target, discriminators), each back-propagated before the next starts, as the original
        does (:class:`ForwardBackward`): the gradients are the same sums as one backward of all
        losses, and only one pass's activations are alive at a time. Under DDP only the
        iteration's last backward all-reduces the gradients. Returns the losses of this rank,
        averaged over the micro-batches.
        """
        iter_size = self.args.iter_size
        loss_sums: dict[str, Tensor] = {}
        for micro_batch in range(iter_size):
            forward_backward = ForwardBackward(self, it, loss_sums, final_micro_batch=micro_batch == iter_size - 1)
            self.stage.step(it, next(batches), forward_backward)
            forward_backward.check_finished()
        return loss_sums

    def train_step(self, it: int, batches: Iterator[tuple]) -> dict[str, float]:
        """One iteration: learning rates, gradients (:meth:`accumulate_gradients`), the NaN check,
        the optimizer steps. Returns the losses averaged over micro-batches and ranks.

        The losses, the pseudo-label monitor's counts and (fp16) the loss scale reach the host
        in one transfer: the iteration's only host sync besides the grad scaler's reads of
        ``found_inf`` (none with fused optimizers, :func:`engine.optim.optimizer_kernels`).
        Losses and counts are all-reduced as one float64 tensor: the counts stay exact (below
        2^53), and the float32 losses, summed in float64 and rounded back to float32, are the
        correctly rounded sum over the ranks (float32's own for two ranks); they are then divided
        by the world size in float32, as before. The same tensor carries one more element, 1 on a
        rank that was asked to stop (:mod:`utils.signals`): its sum sets :attr:`stop_requested`
        on every rank alike, at no extra collective or host sync (docs/BENCHMARKS.md).
        """
        args, stage, env = self.args, self.stage, self.env
        for opt, base in stage.optimizers.values():
            opt.zero_grad(set_to_none=True)
            set_lr(opt, base, it, args)
        sums = self.accumulate_gradients(it, batches)
        names = sorted(sums)
        monitor = stage.pseudo_monitor
        parts = [torch.stack([sums[k] for k in names]).double()]
        if monitor is not None:
            parts.append(monitor.take().double())
        if self.agree_on_stop:  # a fill on the device: no host-to-device copy, no sync
            parts.append(torch.full((1,), float(signals.requested() is not None), dtype=torch.float64,
                                    device=env.device))
        reduced = du.all_reduce_sum(torch.cat(parts), env.device)
        if self.scaler.is_enabled():
            # The scale this iteration's backward used (a device tensor; get_scale() would sync).
            reduced = torch.cat([reduced, self.scaler._get_scale_async().double().reshape(1)])
        host = reduced.cpu()
        n = len(names)
        values = host[:n].float() / env.world_size
        end = n
        if monitor is not None:
            self.quality = monitor.record(host[n:n + monitor.size].long().numpy())
            end += monitor.size
        if self.agree_on_stop:
            self.stop_requested = bool(host[end] > 0)
        self.check_finite(values, names, it)
        if self.scaler.is_enabled():
            self.check_skipped_steps(it, float(host[-1]))
        for opt, _ in stage.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        return dict(zip(names, values.tolist()))

    def check_skipped_steps(self, it: int, scale: float) -> None:
        """fp16: count the iterations whose optimizer steps the grad scaler skipped; stop after
        ``--max_skipped_steps`` in a row (0: never).

        ``scale`` is the loss scale of iteration ``it``. The scaler halves it after an iteration
        with non-finite gradients, whose steps it skips, and only then lowers it; so iteration
        ``it - 1`` was skipped exactly when ``scale`` is below the previous iteration's (known one
        iteration late, at no extra host sync).
        """
        previous, self.loss_scale = self.loss_scale, scale
        if previous is None:
            return
        self.skipped_steps = self.skipped_steps + 1 if scale < previous else 0
        limit = self.args.max_skipped_steps
        if limit and self.skipped_steps >= limit:
            n = self.skipped_steps
            raise NonFiniteLossError(
                f"--amp fp16: the grad scaler skipped the optimizer steps of {n} iterations in a row "
                f"({it - n}..{it - 1}; non-finite gradients at every loss scale, now {scale:g}): the run "
                f"diverged, stopping (--max_skipped_steps {limit}). The last training state is "
                f"{os.path.join(self.args.snapshot_dir, LATEST)}"
            )

    def log_iteration(self, it: int, logged: dict[str, float], bar: Any) -> dict[str, float]:
        """Rank 0: every 10 iterations the scalars in tensorboard; every ``--print-every`` the
        console line (losses, pseudo-label accuracy, time per iteration, peak GPU memory).
        Returns what the iteration's ``metrics.jsonl`` line holds (``{}`` on the other ranks).

        Tensorboard, at step ``it`` when ``it % 10 == 0`` as the original: the stage's
        :attr:`Stage.original_scalars` under the original's tags (``loss_seg``, ...), our other
        logged values under ``train/<name>``, the learning rates under ``lr/<optimizer>``, then
        the stage's and the pseudo-label monitor's scalars under their own names."""
        args, env, stage = self.args, self.env, self.stage
        monitor = stage.pseudo_monitor  # set by build()/batches() when the target ground truth exists
        if not env.is_main:
            return {}
        quality = self.quality if monitor is not None else {}  # summed over ranks by train_step
        mem = peak_memory_mib(env.device)  # CUDA only: the key is left out on the CPU
        scale = {} if self.loss_scale is None else {"loss_scale": self.loss_scale}  # fp16 only
        if self.writer is not None and it % 10 == 0:
            for k in stage.original_scalars:
                self.writer.add_scalar(k, logged[k], it)
            for k, v in logged.items():
                if k not in stage.original_scalars:
                    self.writer.add_scalar(f"train/{k}", v, it)
            if self.loss_scale is not None:
                self.writer.add_scalar("amp/loss_scale", self.loss_scale, it)
            for k, (opt, _) in stage.optimizers.items():
                self.writer.add_scalar(f"lr/{k}", opt.param_groups[0]["lr"], it)
            stage.tensorboard_extra(self.writer, it)
            if monitor is not None:
                monitor.tensorboard(self.writer, it)
        if it % args.print_every == 0:
            text = ", ".join(f"{k} = {v:.5f}" for k, v in logged.items() if k != "total")
            if monitor is not None:
                text += ", " + monitor.console_text()
            if self.loss_scale is not None:
                text += f", loss scale {self.loss_scale:g}"
            bar.set_postfix_str(text[:80])
            LOG.info("iter = %8d/%8d, %s (%.2fs/it%s)", it, args.num_steps, text,
                     (time.time() - self.t0) / max(1, it - self.start_iter + 1), peak_memory_text(env.device))
        return {**logged, **quality, **scale, **({} if mem is None else {"max_mem_mib": mem})}

    def save_checkpoints(self, it: int, record: dict[str, float]) -> None:
        """After iteration ``it`` (all ranks call; rank 0 writes): validation and the best
        checkpoint every ``--save-pred-every``; the iteration's ``metrics.jsonl`` line, ``record``
        (:meth:`log_iteration`) with the validation's ``miou_val`` and ``loss_val``; the training
        state every ``--save_latest_every``. The line is written before the state, so that a run
        resumed from any ``latest.pth`` finds every earlier iteration's line."""
        args = self.args
        if it % args.save_pred_every == 0 and it != 0 and self.val_loader is not None:
            scores = self.validate(it)
            self.maybe_save_best(it, scores["miou_val"])
            record = {**record, **scores}
        if self.env.is_main:
            self.append_metrics(it, record)
        if (it + 1) % args.save_latest_every == 0:
            self.save_latest(it + 1)

    def stop_after(self, it: int, bar: Any) -> None:
        """After iteration ``it`` (its checkpoints written) on a stop request agreed by every rank:
        the training state for iteration ``it + 1`` unless :meth:`save_checkpoints` has just
        written it, then :func:`engine.launch.stop_run` (one line, :class:`utils.signals.StopRequested`).
        The resumed run starts at ``it + 1``: no iteration is lost or done twice."""
        if (it + 1) % self.args.save_latest_every != 0:
            self.save_latest(it + 1)
        bar.close()
        if self.writer is not None:
            self.writer.close()
        path = os.path.join(self.args.snapshot_dir, LATEST)
        if self.env.is_main:
            LOG.info("stop requested: stopping after iteration %d; %s holds the state to continue from iteration %d",
                     it, path, it + 1)
        stop_run(self.env, self.args, f"after iteration {it}, {path} holds the state to continue from iteration "
                                      f"{it + 1}")

    def train(self) -> None:
        """The loop. Each iteration: one optimizer update (:meth:`train_step`), its log
        (:meth:`log_iteration`), its checkpoints and ``metrics.jsonl`` line
        (:meth:`save_checkpoints`); after the last one its line, the final checkpoint and the
        training state (see :func:`stop_iteration` for a ``--num-steps-stop`` beyond
        ``--num-steps``). A stop request agreed in an iteration's :meth:`train_step` ends the run
        after that iteration (:meth:`stop_after`), unless it is the last one."""
        stop, final = stop_iteration(self.args.num_steps, self.args.num_steps_stop)
        batches = self.stage.batches(self.start_iter)
        bar = progress(total=stop, initial=self.start_iter, desc=self.stage.name, env=self.env,
                       quiet=self.args.quiet)
        self.t0 = time.time()
        for it in range(self.start_iter, stop):
            faults.at_iteration(it)  # tests only: nothing unless $DECOUPLENET_FAULT asks
            logged = self.train_step(it, batches)
            bar.update(1)
            record = self.log_iteration(it, logged, bar)
            if it == stop - 1 and final:
                if self.env.is_main:
                    self.append_metrics(it, record)
                    self.save_official(f"{self.stage.checkpoint_prefix}_{stop}.pth")
                self.save_latest(stop)
            else:
                self.save_checkpoints(it, record)
                if it == stop - 1 and stop % self.args.save_latest_every != 0:
                    self.save_latest(stop)  # the end of the schedule: a resume has nothing left to do
                elif self.stop_requested and it != stop - 1:
                    self.stop_after(it, bar)
        bar.close()
        du.barrier(self.env.device)
        if self.writer is not None:
            self.writer.close()


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak GPU memory of this process so far (``torch.cuda.max_memory_allocated``) in MiB on
    CUDA; ``None`` elsewhere (the CPU has no such counter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def peak_memory_text(device: torch.device) -> str:
    """``", peak GPU memory N MiB"`` (:func:`peak_memory_mib`) on CUDA, ``""`` elsewhere."""
    mib = peak_memory_mib(device)
    return "" if mib is None else f", peak GPU memory {mib:.0f} MiB"


def stop_iteration(num_steps: int, num_steps_stop: int) -> tuple[int, bool]:
    """``(iterations, final)``: how many iterations a run makes and whether the last one writes the
    final ``GTA5_<num_steps_stop>.pth``.

    The original loops over ``range(--num-steps)`` and saves and stops at iteration
    ``--num-steps-stop - 1``. So a ``--num-steps-stop`` larger than ``--num-steps`` runs the whole
    schedule and writes no final file: the best checkpoints ``GTA5_<iter>_<miou>.pth`` are then
    the run's result.
    """
    if num_steps_stop <= num_steps:
        return num_steps_stop, True
    return num_steps, False


def run_stage(stage: Stage, writer: Any, with_validation: bool = True) -> Trainer:
    """Build the stage, restore ``--resume_from`` if given, and train."""
    args = stage.args
    if not stop_iteration(args.num_steps, args.num_steps_stop)[1] and stage.env.is_main:
        LOG.warning("--num-steps-stop %d is larger than --num-steps %d: as the original, training runs the %d "
                    "iterations of the schedule and writes no final %s_%d.pth (the best checkpoints "
                    "%s_<iter>_<miou>.pth are the result)", args.num_steps_stop, args.num_steps, args.num_steps,
                    stage.checkpoint_prefix, args.num_steps_stop, stage.checkpoint_prefix)
    path = resolve_resume_from(stage.args)
    stage.resuming = path is not None
    stage.build()
    trainer = Trainer(stage, writer, val_loader(stage.args, stage.env) if with_validation else None)
    if path:
        trainer.restore(path)
    elif stage.args.resume_from == "auto":
        LOG.info("--resume_from auto: no %s in %s, starting fresh", LATEST, stage.args.snapshot_dir)
    if trainer.start_iter >= stop_iteration(args.num_steps, args.num_steps_stop)[0]:
        LOG.info("nothing to do: the training state is already at iteration %d", trainer.start_iter)
        return trainer
    trainer.train()
    return trainer
