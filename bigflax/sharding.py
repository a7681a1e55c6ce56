"""Device mesh and logical-axis rules: where each named dimension of the model lives.

The model names its dimensions (`batch`, `embed`, `heads`, …); `config.mesh.rules` maps each name
onto mesh axes. With the default rules one config covers every parallelism mix by axis sizes:

  data parallel   mesh.data=-1                    params replicated, batch split over data
  FSDP (ZeRO-3)   mesh.fsdp=-1                    params + optimizer state split on `embed`
  FSDP + tensor   mesh.fsdp=-1 mesh.tensor=4      Megatron: heads and MLP hidden split too
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigflax.errors import ShardingError

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ShardingError(f"at most one of config.mesh.{{data,fsdp,tensor}} may be -1, got "
                        f"{dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ShardingError(
        f"config.mesh (data, fsdp, tensor) = {tuple(sizes)} does not fit {num_devices} devices: "
        "sizes must be positive (or one -1) and their product must divide the device count")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ShardingError(
        f"config.mesh (data, fsdp, tensor) = {tuple(sizes)} uses {math.prod(sizes)} devices but "
        f"{num_devices} are present; set the sizes so their product is {num_devices} (or set "
        "one of them to -1)")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A Mesh with Auto axes (GSPMD propagation from our constraints), ICI-topology aware on TPU."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True),
              MESH_AXES)


def rules_of(mesh_config) -> tuple:
  """`config.mesh.rules` as flax wants them, after checking that every rule names real mesh axes."""
  rules = tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes))
                for name, axes in mesh_config.rules)
  for name, axes in rules:
    for axis in (axes,) if isinstance(axes, str) else axes or ():
      if axis not in MESH_AXES:
        raise ShardingError(f"config.mesh.rules maps {name!r} to {axis!r}, which is not a mesh "
                            f"axis; use one of {MESH_AXES} or None")
  return rules


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """The context that model code traced inside needs to resolve its logical constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(logical_specs, mesh: Mesh, rules):
  """A tree of logical PartitionSpecs → the matching tree of NamedShardings on `mesh`."""
  known = {name for name, _ in rules}
  for spec in jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
    for name in spec:
      if name is not None and name not in known:
        raise ShardingError(f"logical axis {name!r} has no rule; add ({name!r}, <mesh axes or "
                            "None>) to config.mesh.rules")
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(abstract_tree, shardings, mesh: Mesh, what: str) -> None:
  """Every sharded dimension must split evenly over its mesh axes; say which field to change."""
  def check(path, leaf, sharding):
    for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      parts = math.prod(mesh.shape[a] for a in axes)
      if size % parts:
        fields = " × ".join(f"config.mesh.{a}" for a in axes)
        raise ShardingError(
            f"{what} {jax.tree_util.keystr(path)} has dimension {dim} of size {size}, not "
            f"divisible by {fields} = {parts}; change {fields} or the model/batch size")
  jax.tree_util.tree_map_with_path(check, abstract_tree, shardings)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """[batch, length] arrays: the batch dimension split over the rules' `batch` axes."""
  return logical_shardings(PartitionSpec("batch", "length"), mesh, rules)


def check_batch_size(config, batch_sharding: NamedSharding) -> None:
  """Each of the grad_accum_steps microbatches must split evenly over the batch's mesh axes."""
  mesh = batch_sharding.mesh
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows_per_step = config.batch_size // config.grad_accum_steps
  if config.batch_size % config.grad_accum_steps or rows_per_step % shards:
    raise ShardingError(
        f"config.batch_size={config.batch_size} must split into config.grad_accum_steps="
        f"{config.grad_accum_steps} microbatches each divisible by config.mesh.data × "
        f"config.mesh.fsdp = {shards}; change config.batch_size or the mesh (config.mesh.tensor "
        "> 1 splits heads instead of rows: fewer, longer rows fit that way)")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def field_sharding(batch_sharding: NamedSharding, ndim: int) -> NamedSharding:
  """The sharding of a batch field of `ndim` dimensions: the batch's, cut to that rank (a [batch]
  field such as a classifier's labels splits its rows the way [batch, length] fields do)."""
  return NamedSharding(batch_sharding.mesh, PartitionSpec(*batch_sharding.spec[:ndim]))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This process's rows of the global batch → global jax.Arrays laid out by `sharding` (cut to
  each field's rank)."""
  return {k: jax.make_array_from_process_local_data(field_sharding(sharding, np.ndim(v)), v)
          for k, v in local_batch.items()}


def process_rows(batch_sharding: NamedSharding, global_batch_size: int) -> slice:
  """The rows of a [global_batch_size, …] batch that this process's devices hold (one range)."""
  index_map = batch_sharding.addressable_devices_indices_map((global_batch_size, 1))
  ranges = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
  start, stop = ranges[0][0], ranges[-1][1]
  if sum(b - a for a, b in ranges) != stop - start:
    raise ShardingError(f"this process's batch rows {ranges} are not one contiguous range; "
                        "order config.mesh so the batch axes are outermost")
  return slice(start, stop)
