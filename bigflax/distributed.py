"""Multi-process start-up: join every process of a run into one JAX system before any JAX use.

One process runs per host (a TPU VM worker, a GPU node) or per GPU; after
`jax.distributed.initialize` they see all devices as one global mesh, and each feeds only its own
rows of every batch (`sharding.process_rows`). The processes are found either from
`config.distributed` (coordinator address, process count, this process's id) or, when that is
empty, from the cluster the run was launched on: a Cloud TPU VM or a SLURM `srun` step. Elsewhere
the run stays a single process.
"""

import contextlib
import os
import pathlib
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from bigflax.errors import DistributedError, UserError, first_line

GOOGLE_PCI_VENDOR = "0x1ae0"  # the vendor id of TPU chips on the host's PCI bus


def _on_cloud_tpu(environ, pci_devices: pathlib.Path) -> bool:
  # GKE TPU pods list their workers in the environment; TPU VMs show their chips on the PCI bus
  # (JAX then reads the workers from the VM's metadata server).
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len(hosts.split(",")) > 1:
    return True
  vendors = pci_devices.glob("*/vendor") if pci_devices.is_dir() else ()
  return any(path.read_text().strip() == GOOGLE_PCI_VENDOR for path in vendors)


def _in_slurm_step(environ, pci_devices: pathlib.Path) -> bool:
  # Inside `srun` (a step has a node list) with more than one task; sbatch's own shell is not.
  del pci_devices
  return ("SLURM_JOB_ID" in environ and "SLURM_STEP_NODELIST" in environ
          and int(environ.get("SLURM_NTASKS", "1")) > 1)


# Clusters on which `jax.distributed.initialize()` finds coordinator, process count and id itself.
CLUSTERS = {"cloud_tpu": _on_cloud_tpu, "slurm": _in_slurm_step}


def detect_cluster(environ=os.environ,
                   pci_devices: pathlib.Path = pathlib.Path("/sys/bus/pci/devices")) -> str | None:
  return next((name for name, present in CLUSTERS.items() if present(environ, pci_devices)), None)


def initialize(dist_config, environ=os.environ) -> None:
  """Joins this process to the run's others, if it has any.

  Must run before anything initializes a JAX backend (jax.devices(), a first array, …)."""
  d = dist_config
  if d.coordinator_address:
    how = f"coordinator {d.coordinator_address}"
    arguments = {"coordinator_address": d.coordinator_address, "num_processes": d.num_processes,
                 "process_id": d.process_id}
    if d.process_id != 0:
      _wait_for_coordinator(d.coordinator_address, d.initialization_timeout)
  elif d.auto_detect and (cluster := detect_cluster(environ)):
    how, arguments = f"{cluster} cluster", {}
  else:
    return  # a single process
  # When the processes do not all meet in time, or one dies later, XLA aborts this process with
  # its own message (no Python exception to catch): say beforehand which settings govern that.
  print(f"bigflax: joining the run through the {how}; waiting up to "
        f"config.distributed.initialization_timeout={d.initialization_timeout} s for every "
        f"process, a process silent for config.distributed.heartbeat_timeout="
        f"{d.heartbeat_timeout} s counts as dead", file=sys.stderr, flush=True)
  try:
    jax.distributed.initialize(**arguments, initialization_timeout=d.initialization_timeout,
                               heartbeat_timeout_seconds=d.heartbeat_timeout)
  except (RuntimeError, ValueError) as e:  # e.g. a cluster that names no coordinator
    raise DistributedError(f"could not join the run through the {how}: {first_line(e)}; set "
                           "config.distributed.coordinator_address, num_processes and "
                           "process_id") from e
  if d.num_processes and jax.process_count() != d.num_processes:
    raise DistributedError(
        f"config.distributed.num_processes={d.num_processes} but the coordinator formed a run "
        f"of {jax.process_count()} processes; give every process the same "
        "config.distributed.num_processes, the number of processes actually started")


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """A clear error instead of XLA's abort when process 0 never listens at `address`."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedError(
            f"nothing answers at config.distributed.coordinator_address={address} after "
            f"config.distributed.initialization_timeout={timeout} s ({e}); start process 0 "
            "there, or fix the address") from e
      time.sleep(0.5)


def check_shared_workdir(workdir: str) -> None:
  """Every process writes its shards of the checkpoints under the workdir, so it must be one
  directory that all hosts see; else the first save would wait forever for the missing shards."""
  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(np.random.randint(2**31, dtype=np.int32)))
  marker = pathlib.Path(workdir) / f".shared_check_{token}"
  if jax.process_index() == 0:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
  multihost_utils.sync_global_devices("bigflax: workdir marker written")
  seen = marker.exists()
  multihost_utils.sync_global_devices("bigflax: workdir marker read")
  if jax.process_index() == 0:
    marker.unlink()
  if not seen:
    raise DistributedError(
        f"--workdir {workdir} is not one directory shared by all hosts: process "
        f"{jax.process_index()} does not see what process 0 wrote there; put the workdir on a "
        "filesystem every host mounts (NFS, Filestore, gcsfuse)")


@contextlib.contextmanager
def fail_fast():
  """A process of a multi-process run that stops on an error exits at once: JAX's orderly exit
  would wait for the others, which wait for it. Its death then stops them (heartbeat)."""
  try:
    yield
  except UserError as e:
    if not jax.distributed.is_initialized():
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    os._exit(1)


@contextlib.contextmanager
def stdout_from_process_zero():
  """Whatever the run prints comes once, from process 0; the others' stdout goes nowhere (their
  errors still reach stderr)."""
  if jax.process_index() == 0:
    yield
    return
  with open(os.devnull, "w", encoding="utf-8") as devnull, contextlib.redirect_stdout(devnull):
    yield
