"""Meshes, sharding helpers and multi-process start-up on JAX's own distributed runtime.

The same code runs on one CPU, on many devices of one process (e.g. ``JAX_NUM_CPU_DEVICES=8``) and
on many processes (hosts): every process runs the same program on *global* arrays
(``jax.Array`` spread over the devices of all processes), started by :func:`initialize` (a wrapper
of ``jax.distributed.initialize``). Batches are split over a 1-D mesh axis ``"data"``
(:func:`data_mesh`, :func:`shard_batch`), parameters are replicated (:func:`replicate`), results
come back to every process with :func:`gather`, and only the main process writes files
(:func:`is_main_process`).

Placement never changes a sample: the noise of sample ``b`` depends only on ``(key, b)`` with
``b`` the index in the *global* batch (:mod:`fastsample.noise`), so sharded sampling gives each
sample the values it gets on one device.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "initialize",
    "is_initialized",
    "is_main_process",
    "process_count",
    "data_mesh",
    "resolve_mesh",
    "batch_sharding",
    "shard_batch",
    "replicate",
    "gather",
    "ENV_VARS",
]

#: Environment variables read by :func:`initialize` when an argument is not given, in order of
#: precedence (fastsample's own first, then JAX's).
ENV_VARS = {
    "coordinator_address": ("FASTSAMPLE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("FASTSAMPLE_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("FASTSAMPLE_PROCESS_ID", "JAX_PROCESS_ID"),
}

AXIS = "data"


def _from_env(name: str, value, as_int: bool):
    """``value`` if given, else the first of ``ENV_VARS[name]`` that is set (``None`` if none is)."""
    source = name
    if value is None:
        for var in ENV_VARS[name]:
            if os.environ.get(var, "").strip():
                value, source = os.environ[var].strip(), var
                break
    if value is None or not as_int:
        return value
    try:
        if isinstance(value, bool) or float(value) != int(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a non-negative integer; got {value!r}.") from None


def is_initialized() -> bool:
    """Whether ``jax.distributed`` has been initialized in this process."""
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    from jax._src import distributed as _d  # JAX versions without the public check

    return _d.global_state.client is not None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, timeout: int = 300) -> bool:
    """Join a multi-process JAX job (``jax.distributed.initialize``); a no-op for one process.

    Arguments not given are read from the environment (:data:`ENV_VARS`):
    ``FASTSAMPLE_COORDINATOR_ADDRESS`` / ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
    ``FASTSAMPLE_NUM_PROCESSES`` / ``JAX_NUM_PROCESSES`` and ``FASTSAMPLE_PROCESS_ID`` /
    ``JAX_PROCESS_ID``. With no process count, or a count of 1, nothing happens. On CPU the
    cross-process collectives use gloo (``jax_cpu_collectives_implementation``). Call it before
    any JAX computation. Managed clusters (TPU pods, SLURM) can instead call
    ``jax.distributed.initialize()`` themselves; everything here works after either.

    Returns:
        ``True`` if this process is now part of a multi-process job.
    """
    address = _from_env("coordinator_address", coordinator_address, as_int=False)
    count = _from_env("num_processes", num_processes, as_int=True)
    pid = _from_env("process_id", process_id, as_int=True)
    if count is None or count == 1:
        if pid not in (None, 0):
            raise ValueError(f"process_id={pid} needs num_processes > {pid}; got num_processes={count}.")
        return False
    if count < 1:
        raise ValueError(f"num_processes must be >= 1; got {count}.")
    if not address:
        raise ValueError(f"num_processes={count} needs a coordinator address (host:port of process 0): pass "
                         "--coordinator-address / coordinator_address= or set FASTSAMPLE_COORDINATOR_ADDRESS.")
    if ":" not in str(address):
        raise ValueError(f"the coordinator address must be host:port; got {address!r}.")
    if pid is None:
        raise ValueError(f"num_processes={count} needs this process's id (0 ... {count - 1}): pass --process-id / "
                         "process_id= or set FASTSAMPLE_PROCESS_ID.")
    if not 0 <= pid < count:
        raise ValueError(f"process_id must be in [0, {count - 1}] for num_processes={count}; got {pid}.")
    if is_initialized():
        if (jax.process_count(), jax.process_index()) != (count, pid):
            raise ValueError(f"jax.distributed is already initialized as process {jax.process_index()} of "
                             f"{jax.process_count()}; asked for process {pid} of {count}.")
        return True
    _use_cpu_collectives()
    try:
        jax.distributed.initialize(str(address), count, pid, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout)
    except RuntimeError as e:
        if "before" in str(e).lower():
            raise RuntimeError("fastsample.distributed.initialize must run before any JAX computation "
                               f"(the XLA backend is already started): {e}") from e
        raise
    return True


def _use_cpu_collectives() -> None:
    """Cross-process collectives on CPU need an implementation (gloo; older JAX defaulted to none)."""
    name = "jax_cpu_collectives_implementation"
    try:
        current = getattr(jax.config, name)
    except AttributeError:
        return
    if current not in ("gloo", "mpi"):
        jax.config.update(name, "gloo")


def process_count() -> int:
    """The number of processes of the job (1 without :func:`initialize`)."""
    return jax.process_count()


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes results, logs and solver files."""
    return jax.process_index() == 0


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices of all processes, in
    process order, so each process holds a contiguous block of the batch)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device.")
    return Mesh(np.array(devices), (AXIS,))


def resolve_mesh(mesh) -> Mesh | None:
    """``None`` (no sharding), ``"all"`` (:func:`data_mesh` over every device) or a ``Mesh`` with a
    ``"data"`` axis."""
    if mesh is None:
        return None
    if isinstance(mesh, str):
        if mesh != "all":
            raise ValueError(f"mesh must be None, 'all' or a jax.sharding.Mesh with a 'data' axis; got {mesh!r}.")
        return data_mesh()
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be None, 'all' or a jax.sharding.Mesh; got {type(mesh).__name__}.")
    if AXIS not in mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named 'data' to shard the batch over; its axes are "
                         f"{tuple(mesh.axis_names)}.")
    return mesh


def batch_sharding(mesh: Mesh, ndim: int = 1, axis: int = 0) -> NamedSharding:
    """The sharding that splits axis ``axis`` of an ``ndim``-D array over ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), AXIS, *([None] * (ndim - axis - 1))))


def _multi_process(mesh: Mesh) -> bool:
    return jax.process_count() > 1 and len({d.process_index for d in mesh.devices.flat}) > 1


def _place_global(x, sharding: NamedSharding):
    """Put an array that every process holds in full (numpy or fully addressable) on ``sharding``."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global: reshard
    if not _multi_process(sharding.mesh):
        return jax.device_put(x, sharding)
    # Across processes each one builds its own shards from its (identical) host copy; a device-
    # resident local array goes through the host first (device_put of it does not give valid shards).
    host = np.asarray(x)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(x: Any, mesh, *, axis: int = 0, local: bool = False):
    """Split the batch axis ``axis`` of every array in the pytree ``x`` over the mesh's ``"data"`` axis.

    Arguments:
        x: arrays sharing the batch axis, or already placed global arrays (returned resharded if needed).
        mesh: a ``Mesh`` with a ``"data"`` axis or ``"all"``.
        local: ``False``: every process passes the whole global batch (the same values everywhere,
            e.g. drawn from the same key) and keeps its own slice. ``True``: every process passes only
            its own contiguous slice, in process order; the global batch is their concatenation.

    The global batch size must be a multiple of the number of devices on ``"data"``.
    """
    mesh = resolve_mesh(mesh)
    devices = mesh.shape[AXIS]

    def one(a):
        if not isinstance(a, jax.Array):
            a = np.asarray(a)
        if a.ndim <= axis:
            raise ValueError(f"shard_batch: axis {axis} does not exist in an array of shape {a.shape}.")
        sharding = batch_sharding(mesh, a.ndim, axis)
        if local and not (isinstance(a, jax.Array) and not a.is_fully_addressable):
            local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
            if local_devices == 0 or a.shape[axis] % local_devices:
                raise ValueError(f"the local batch ({a.shape[axis]} along axis {axis}) must be a multiple of this "
                                 f"process's {local_devices} devices on the mesh's 'data' axis.")
            global_shape = a.shape[:axis] + (a.shape[axis] * devices // local_devices,) + a.shape[axis + 1:]
            return jax.make_array_from_process_local_data(sharding, np.asarray(a), global_shape)
        if a.shape[axis] % devices:
            raise ValueError(f"the batch size ({a.shape[axis]} along axis {axis}) must be a multiple of the {devices} "
                             "devices on the mesh's 'data' axis; pad the batch or use a smaller mesh.")
        return _place_global(a, sharding)

    return jax.tree.map(one, x)


def replicate(tree: Any, mesh):
    """Every array of ``tree`` replicated on all devices of ``mesh`` (parameters, optimizer state).
    Every process must pass the same values."""
    mesh = resolve_mesh(mesh)
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: _place_global(a if isinstance(a, jax.Array) else np.asarray(a), sharding), tree)


def gather(x: Any):
    """The pytree ``x`` as numpy arrays holding the full (global) values, on every process."""

    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
            return np.asarray(a)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(one, x)
