"""The training loop over N processes with torch.distributed (DistributedDataParallel), as `torchrun` and
`accelerate launch` start it.

* Init: from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT - what torchrun
  sets, and what `accelerate launch` sets through torchrun's launcher) with `torch.distributed.init_process_group`
  ("env://"); NCCL on CUDA, gloo on CPU. One process per device; process i uses cuda:LOCAL_RANK.
* Only the LoRA network is wrapped in DistributedDataParallel (the trainable side paths, not the base model):
  DDP all-reduces their gradients (mean over processes) during backward; gradient accumulation skips the
  all-reduce (`no_sync`) on all but a step's last micro-batch.
* Data: `TrainConfig.batch_size` is the GLOBAL batch (per-device batch x processes). The batch plan (buckets,
  epochs, shuffling: `dataset.BatchPlan`) is the one a single process would use; each global batch is split
  DistributedSampler-style (rank r takes rows r, r+N, ...), padded to the same length per process with rows that
  weigh 0 in the loss, so the all-reduced gradient is exactly the gradient of the global batch's mean loss. Noise,
  timesteps and caption augmentation are drawn for the whole global batch and each process takes its rows: N
  processes train the same LoRA as one process with the same global batch (to fp32 rounding), and a run can be
  resumed on another process count with the same global batch.
* Latent caching: each process encodes every N-th image, then the latents are exchanged (all_gather_object).
* Saving and logging: rank 0 writes the LoRA file, the step files and the state (atomically), between barriers
  so no process runs ahead of a save; the other ranks write nothing. Resume: every rank loads the same state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lora_core.errors import LoraValueError

from .loop import LoraTrainer

log = logging.getLogger("lora_core.train")

BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DistContext:
    """This process's place in the run. `world_size` 1 = a plain one-process run (no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over processes of a tensor (on this process's device)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        return value

    def close(self) -> None:
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.initialized_here = False


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise LoraValueError(f"Environment variable {name}={raw!r} is not an integer; it is set by torchrun / "
                             f"accelerate launch. Unset it, or start the run with one of those.") from None


def pick_device(device: str, local_rank: int) -> torch.device:
    """'auto': cuda:LOCAL_RANK when CUDA is available, else the CPU; 'cuda' refuses a machine without CUDA."""
    if device not in DEVICES:
        raise LoraValueError(f"device {device!r} is not one of {list(DEVICES)}.")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LoraValueError("device = 'cuda' but torch sees no CUDA device here; use 'auto' or 'cpu'.")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LoraValueError(f"LOCAL_RANK {local_rank} but only {count} CUDA device(s): start at most {count} "
                             f"processes per machine (torchrun --nproc_per_node={count}).")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_from_env(backend: str = "auto", device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """The DistContext of this process, from torchrun's / accelerate's environment. Without WORLD_SIZE (or with
    WORLD_SIZE=1) it is a one-process run; otherwise the default process group is initialised here (or an existing
    one is used)."""
    if backend not in BACKENDS:
        raise LoraValueError(f"distributed backend {backend!r} is not one of {list(BACKENDS)}.")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise LoraValueError(f"RANK={rank} / WORLD_SIZE={world} from the environment are inconsistent.")
    torch_device = pick_device(device, local_rank)
    if world == 1:
        return DistContext(device=torch_device)
    if not torch.distributed.is_available():
        raise LoraValueError("This torch build has no torch.distributed; multi-process training needs it.")
    chosen = backend if backend != "auto" else ("nccl" if torch_device.type == "cuda" else "gloo")
    if chosen == "nccl" and torch_device.type != "cuda":
        raise LoraValueError("The NCCL backend needs CUDA devices; on CPU use backend = 'gloo' (or 'auto').")
    here = False
    if not torch.distributed.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise LoraValueError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set: start the run with "
                                 f"torchrun or accelerate launch, which set them.")
        torch.distributed.init_process_group(chosen, init_method="env://", rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=timeout_s))
        here = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=chosen, device=torch_device,
                       initialized_here=here)


class _TrainableParameters(nn.Module):
    """What DDP wraps: the trainable LoRA parameters (the same Parameter objects the optimizer holds) and a
    forward that is one micro-batch's loss."""

    def __init__(self, parameters, loss_of):
        super().__init__()
        self.params = nn.ParameterList(parameters)
        self._loss_of = [loss_of]   # in a list: not a registered attribute

    def forward(self, micro: int) -> torch.Tensor:
        return self._loss_of[0](micro)


class DistributedTrainer(LoraTrainer):
    """LoraTrainer over the processes of `dist` (DistContext). `config.batch_size` is the global batch."""

    def __init__(self, *args, dist: DistContext, **kwargs):
        super().__init__(*args, **kwargs)
        self.dist = dist
        self.ddp = None
        self._barriers = True
        if dist.enabled:
            if self.config.batch_size < 1:
                raise LoraValueError("batch size must be >= 1.")
            from torch.nn.parallel import DistributedDataParallel

            holder = _TrainableParameters(self.trainable, self._micro_loss)
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The holder has no buffers (alpha stays in the network, fixed); the parameters are broadcast from
            # rank 0 once, here (they are equal anyway: the same seed draws them on every rank).
            self.ddp = DistributedDataParallel(holder, device_ids=ids)

    # -------------------------------------------------------------- data
    def _shard(self, batch: int):
        if not self.dist.enabled:
            return super()._shard(batch)
        world, rank = self.dist.world_size, self.dist.rank
        rows = list(range(rank, batch, world))
        per_process = -(-batch // world)
        weights = [1.0] * len(rows)
        k = 0
        while len(rows) < per_process:   # pad (DistributedSampler pads by repeating): rows that weigh 0
            rows.append((rank + k) % batch)
            weights.append(0.0)
            k += 1
        return rows, torch.tensor(weights)

    def _cache_latents(self) -> None:
        """Each process encodes every N-th image not cached yet; the latents are then exchanged, so the VAE
        work is split N ways and every process holds the same latents."""
        if not self.dist.enabled:
            return super()._cache_latents()
        missing = [i for i, s in enumerate(self.dataset.samples) if s.latent is None and i not in self._latents]
        mine = {}
        for i in missing[self.dist.rank::self.dist.world_size]:
            with torch.no_grad():
                mine[i] = self.encode_images(self.dataset.samples[i].image[None])[0].detach().to("cpu", torch.float32)
        parts = [None] * self.dist.world_size
        torch.distributed.all_gather_object(parts, mine)
        for part in parts:
            self._latents.update(part)

    # -------------------------------------------------------------- one micro-batch
    def _backward_micro(self, micro: int, last: bool) -> float:
        if self.ddp is None:
            return super()._backward_micro(micro, last)
        world = self.dist.world_size
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            share = self.ddp(micro) / self.config.grad_accum       # this process's part of the batch mean
            # DDP averages gradients over processes; the batch mean is their sum.
            loss = share * world
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        return float(self.dist.all_sum(share.detach().float()))

    # -------------------------------------------------------------- saving
    def metadata(self) -> dict:
        meta = super().metadata()
        if self.dist.enabled:
            meta["ss_batch_size_per_device"] = str(max(1, self.config.batch_size // self.dist.world_size))
            meta["lora_core.world_size"] = str(self.dist.world_size)
        return meta

    def save(self, final: bool) -> Optional[str]:
        if self.output is None or not self.dist.enabled:
            return super().save(final)
        path = self.output.final if final else self.output.step_file(self.step)
        if self._barriers:
            self.dist.barrier()
        try:
            written = super().save(final) if self.dist.is_main else os.path.abspath(path)
        finally:
            if self._barriers:
                self.dist.barrier()
        return written

    def _save_after_failure(self, failure: BaseException) -> None:
        # A failure may be this process's alone: no barrier (the others may never reach it); rank 0 saves.
        if self.dist.enabled and not self.dist.is_main:
            return
        self._barriers = False
        try:
            super()._save_after_failure(failure)
        finally:
            self._barriers = True
