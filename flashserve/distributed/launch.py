"""Starting and stopping a tensor-parallel group: spawned workers on one machine, or the ranks of ``torchrun``.

``start_group(config)`` (called by the engine before it builds its model) checks that the model can be split, then:

- when ``torch.distributed`` is already initialised or the process was started by ``torchrun`` (``RANK`` and
  ``WORLD_SIZE`` in the environment), joins that group: every rank runs the same program, the world size must be
  ``tensor_parallel_size``, rank r uses ``cuda:LOCAL_RANK``. The other ranks follow rank 0 inside each
  ``LLM.generate`` / ``LLM.chat`` call (and return an empty list).
- otherwise spawns ``tensor_parallel_size - 1`` worker processes (rank r on ``cuda:r``; rank 0 is the calling
  process on ``cuda:0``), which rendezvous at ``MASTER_ADDR:MASTER_PORT`` — by default 127.0.0.1 and a port found
  free at run time. Workers follow rank 0 until the engine is closed or garbage-collected, and exit when the
  calling process dies (they watch their parent's pid).

The backend is NCCL on CUDA and gloo on the CPU. Ranks that wait for the next step wait inside a broadcast, for as
long as the engine is idle (a server may idle for hours), so the group is created with a long timeout; a spawned
worker that dies makes rank 0's collectives raise (gloo by itself, NCCL through ``_watch_workers``).
"""
import dataclasses
import datetime
import gc
import logging
import multiprocessing
import os
import socket
import threading
import time

import torch
import torch.distributed as dist

from flashserve.config import Config
from flashserve.distributed.checks import check_split
from flashserve.distributed.state import set_tp_group
from flashserve.models.spec import load_spec

GROUP_TIMEOUT = datetime.timedelta(days=30)
WORKER_JOIN_TIMEOUT_S = 30.0
PARENT_POLL_INTERVAL_S = 0.5

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class ParallelGroup:
    """This process's membership of a tensor-parallel group.

    Attributes:
        rank, size: this process's rank and the number of ranks.
        workers: the spawned worker processes (rank 0 of a spawned group; empty under torchrun).
        owns_group: whether ``start_group`` initialised ``torch.distributed`` (and ``close`` destroys it).
        closed: whether ``close`` ran.
    """

    rank: int
    size: int
    workers: list
    owns_group: bool
    closed: bool = False

    @property
    def follows_per_call(self) -> bool:
        """Whether the ranks other than 0 run the program too (torchrun) and follow rank 0 one call at a time."""
        return not self.workers

    def close(self, runner=None) -> None:
        """Leave the group: rank 0 of a spawned group tells its workers to stop (through ``runner``) and waits
        for them; ``runner``'s CUDA graphs are freed (NCCL cannot destroy a communicator that graphs still use)
        and the group is destroyed if ``start_group`` created it. Idempotent."""
        global _active
        if self.closed:
            return
        self.closed = True
        if self.workers and runner is not None:
            from flashserve.engine.input_buffers import SHUTDOWN

            try:
                runner.signal_followers(SHUTDOWN)
            except Exception as error:  # a worker that died: terminated below
                logger.warning("could not tell the tensor-parallel workers to stop: %s", error)
        if runner is not None:
            runner.release_graphs()
        for process in self.workers:
            process.join(WORKER_JOIN_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(WORKER_JOIN_TIMEOUT_S)
        if self.owns_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as error:  # e.g. a group aborted after a worker died
                logger.warning("could not destroy the tensor-parallel group: %s", error)
        set_tp_group(0, 1)
        if _active is self:
            _active = None


_active: ParallelGroup | None = None


def start_group(config: Config) -> tuple[ParallelGroup | None, Config]:
    """Join or start the group of ``config.tensor_parallel_size`` ranks (None for 1) and return it with this rank's
    config (its device). ValueError, before any worker starts, when the model cannot be split that way, when
    there are fewer GPUs than ranks, or when torchrun's world size differs from ``tensor_parallel_size``."""
    global _active
    size = config.tensor_parallel_size
    if size == 1:
        return None, config
    torchrun = dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    on_cuda = config.torch_device.type == "cuda"
    if on_cuda and not torchrun:
        if config.torch_device.index not in (None, 0):
            raise ValueError(f"device must be 'cuda' with tensor_parallel_size > 1 (rank r runs on cuda:r; pick the "
                             f"GPUs with CUDA_VISIBLE_DEVICES), got {config.device!r}")
        _check_gpus(size, "tensor_parallel_size")
    check_split(load_spec(config.model), size)
    if _active is not None:
        gc.collect()  # a dropped engine in a reference cycle closes its group here
    if _active is not None:
        raise ValueError("tensor_parallel_size: another tensor-parallel engine of this process is still open; "
                         "close it first (LLM.close())")
    backend = "nccl" if on_cuda else "gloo"
    if torchrun:
        group, rank_config = _join(config, backend)
    else:
        group, rank_config = _spawn(config, backend)
    _active = group
    return group, rank_config


def _join(config: Config, backend: str) -> tuple[ParallelGroup, Config]:
    """Join the group of torchrun (or one the caller initialised)."""
    size = config.tensor_parallel_size
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(f"tensor_parallel_size ({size}) must equal the world size of the torch.distributed group "
                         f"({world}, WORLD_SIZE) it runs in")
    rank_config = config
    if config.torch_device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        _check_gpus(local_rank + 1, "LOCAL_RANK + 1")
        rank_config = dataclasses.replace(config, device=f"cuda:{local_rank}")
        torch.cuda.set_device(local_rank)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    rank = dist.get_rank()
    if rank != 0:
        logging.getLogger("flashserve").setLevel(logging.WARNING)  # rank 0 logs the start-up
    set_tp_group(rank, size)
    return ParallelGroup(rank, size, [], owns_group), rank_config


def _spawn(config: Config, backend: str) -> tuple[ParallelGroup, Config]:
    """Start workers 1 .. size - 1 and make this process rank 0."""
    size = config.tensor_parallel_size
    on_cuda = config.torch_device.type == "cuda"
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ["MASTER_PORT"]) if os.environ.get("MASTER_PORT") else free_port(address)
    init_method = f"tcp://{address}:{port}"
    context = multiprocessing.get_context("spawn")
    workers = []
    for rank in range(1, size):
        rank_config = dataclasses.replace(config, device=f"cuda:{rank}") if on_cuda else config
        process = context.Process(target=worker_main, args=(rank_config, rank, size, init_method, os.getpid()),
                                  name=f"flashserve-tp-rank{rank}", daemon=True)
        process.start()
        workers.append(process)
    group = ParallelGroup(0, size, workers, owns_group=True)
    try:
        if on_cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=init_method, rank=0, world_size=size, timeout=GROUP_TIMEOUT)
    except BaseException:
        group.owns_group = dist.is_initialized()
        group.close()
        raise
    set_tp_group(0, size)
    if backend == "nccl":
        threading.Thread(target=_watch_workers, args=(group,), name="tp-worker-watch", daemon=True).start()
    return group, dataclasses.replace(config, device="cuda:0") if on_cuda else config


def _watch_workers(group: ParallelGroup) -> None:
    """Rank 0 of a spawned NCCL group: when a worker dies while the group is open, abort the group, so that rank
    0's pending or next collective raises instead of waiting for the dead rank (for the group's whole timeout).
    With gloo nothing is needed: a dead worker's sockets close and the collectives raise at once."""
    while not group.closed:
        dead = [process for process in group.workers if process.exitcode is not None]
        if dead and not group.closed:
            logger.error("tensor-parallel worker %s exited with code %s: aborting the group", dead[0].name,
                         dead[0].exitcode)
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as error:  # an experimental API: say so rather than die in a daemon thread
                logger.error("could not abort the tensor-parallel group: %s", error)
            return
        time.sleep(PARENT_POLL_INTERVAL_S)


def _check_gpus(needed: int, name: str) -> None:
    count = torch.cuda.device_count()
    if needed > count:
        raise ValueError(f"{name} ({needed}) is larger than the number of GPUs ({count})")


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def worker_main(config: Config, rank: int, size: int, init_method: str, parent_pid: int) -> None:
    """A spawned rank: join the group, build its ModelRunner in lockstep with rank 0, and follow rank 0's steps
    until shutdown."""
    from flashserve.engine.input_buffers import SHUTDOWN
    from flashserve.engine.model_runner import ModelRunner

    threading.Thread(target=_exit_with_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()
    logging.getLogger("flashserve").setLevel(logging.WARNING)  # rank 0 logs the start-up
    if config.torch_device.type == "cuda":
        torch.cuda.set_device(config.torch_device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    backend = "nccl" if config.torch_device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=GROUP_TIMEOUT)
    set_tp_group(rank, size)
    try:
        runner = ModelRunner(config)
        while runner.follow() != SHUTDOWN:
            pass
        runner.release_graphs()
    except Exception:
        if _parent_gone(parent_pid):  # rank 0 was killed (e.g. a server's SIGTERM): its sockets closed first
            os._exit(1)
        raise
    finally:
        dist.destroy_process_group()


def _exit_with_parent(parent_pid: int) -> None:
    """End this process as soon as its parent is gone (re-parented processes see another parent pid)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_INTERVAL_S)
    os._exit(1)


def _parent_gone(parent_pid: int, wait_s: float = 2.0) -> bool:
    """Whether the parent dies within ``wait_s`` (a collective fails as soon as the dead parent's sockets close,
    slightly before the process is gone)."""
    deadline = time.monotonic() + wait_s
    while os.getppid() == parent_pid:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
