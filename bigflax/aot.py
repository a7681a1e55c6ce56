"""Ahead-of-time compilation for a TPU topology from any machine: will the model fit the slice?

Compiles the real train step (same model, optimizer, mesh and logical rules as `bigflax train`)
for a TPU topology described by libtpu — no TPU needed — and reads the per-device memory the
compiler planned, the FLOPs it counted and the collectives it inserted. When the step does not
fit in HBM it compiles a few variants (more FSDP, rematerialisation, smaller microbatches) and
reports the ones that do. It also lists the largest temporary buffers of the compiler's buffer
assignment, with the op that makes each, so a user sees which activation to shrink.
"""

import collections
import copy
import dataclasses
import functools
import math
import os
import pathlib
import re
import tempfile

import jax

from bigflax import flops, hardware, run as run_lib, sharding
from bigflax.errors import UserError, first_line

COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                        r"(?:-start)?\(")
# The buffer assignment XLA dumps: an allocation header, then one line per HLO value it holds.
ALLOCATION = re.compile(r"^allocation \d+: size \d+, (.*)$")
VALUE = re.compile(r"^ value: <\d+ ([^ ]+?)(?:\{[^}]*\})? @\d+> \(size=(\d+),offset=(\d+)\): (.*)$")
OP_NAME = re.compile(r"^\s*(?:ROOT )?%([^ ]+) = .*?metadata=\{op_name=\"([^\"]*)\"", re.MULTILINE)


def _grid(chips: int, rank: int) -> str:
  """Power-of-two chips as the near-cubic (or near-square) slice shape Cloud TPU uses."""
  k = int(math.log2(chips))
  exps = [k // rank + (1 if i >= rank - k % rank else 0) for i in range(rank)]
  if rank == 3 and exps[0] == 0:  # e.g. 4 chips: 2x2x1, not 1x2x2
    exps = exps[1:] + exps[:1]
  return "x".join(str(2**e) for e in exps)


def topology_name(name: str) -> str:
  """`v5p:4x4x4` passes through; `v5e-256`/`v5p-128`-style slice names become topologies.

  The number after the dash counts chips for v5e/v6e and TensorCores (2 per chip) for v4/v5p."""
  if ":" in name:
    return name
  match = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name)
  cores_per_chip = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
  if match:
    generation, count = match.group(1), int(match.group(2))
    chips = count // cores_per_chip[generation]
    if chips >= 1 and chips & (chips - 1) == 0 and count % cores_per_chip[generation] == 0:
      return f"{generation}:{_grid(chips, 3 if cores_per_chip[generation] == 2 else 2)}"
  raise UserError(f"--topology {name!r} is not a TPU topology: use e.g. v5p:4x4x4, v5e:4x4, or a "
                  "slice name with a power-of-two size such as v5e-256, v5p-64, v4-32, v6e-16")


def _tpu_devices(topology: str):
  # libtpu describes the topology without a TPU; these keep it from probing for real hardware,
  # and from locking it: AOT compiles touch no chip, so several may run at once.
  for key, value in {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                     "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
                     "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
    os.environ.setdefault(key, value)
  try:
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # libtpu missing, or a topology it does not know
    raise UserError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: "
                    f"{first_line(e)[:200]}). AOT compilation needs libtpu: "
                    "pip install -e '.[tpu]'") from None


@dataclasses.dataclass
class Plan:
  """What the compiler planned for one device of the slice."""
  topology: str
  device_kind: str
  mesh: dict
  changes: dict  # config overrides relative to the requested config
  argument_bytes: int  # params + optimizer state + batch
  output_bytes: int
  alias_bytes: int  # outputs that reuse donated argument buffers
  temp_bytes: int  # activations and other temporaries
  hbm_bytes: int
  flops_per_device: float  # XLA's count: a scanned layer loop's body counts once
  model_flops_per_device: float  # bigflax.flops: 6·N + 12·L·T·d per token
  collectives: dict
  scanned: bool = False  # config.model.scan_layers
  out_of_memory: str = ""  # the TPU compiler's own refusal, when it ran out of HBM
  largest_temps: list = dataclasses.field(default_factory=list)  # TempBuffers, largest first

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return not self.out_of_memory and self.total_bytes <= self.hbm_bytes


@dataclasses.dataclass(frozen=True)
class TempBuffer:
  """One buffer in the compiler's temporary (activation) memory."""
  bytes: int
  shape: str  # dtype[dims], e.g. bf16[4,4096,4096]
  instruction: str  # the HLO instruction that writes it
  op: str  # the JAX op it came from (the HLO metadata's op_name), "" if XLA made it up


def largest_temporaries(buffer_assignment: str, hlo_text: str, count: int = 5) -> list:
  """The `count` largest buffers of the default memory space's temporary allocation, from the
  buffer assignment XLA dumps and the optimized HLO (which names each instruction's JAX op).

  Values at the same offset and size are one buffer (updated in place, or reused once the first
  is dead): it is listed once, by the first value that names a JAX op."""
  ops = dict(OP_NAME.findall(hlo_text))
  buffers, in_temp = {}, False
  for line in buffer_assignment.splitlines():
    header = ALLOCATION.match(line)
    if header:  # other colors are other memory spaces (on-chip VMEM, semaphores), not HBM
      in_temp = header.group(1) == "preallocated-temp:"
      continue
    value = VALUE.match(line) if in_temp else None
    if value and not value.group(4).startswith("("):  # a tuple's own buffer is a pointer table
      name, size, offset, shape = value.groups()
      if not buffers.get((offset, size), TempBuffer(0, "", "", "")).op:
        buffers[offset, size] = TempBuffer(int(size), re.sub(r"\{[^}]*\}", "", shape), name,
                                           ops.get(name, ""))
  return sorted(buffers.values(), key=lambda b: -b.bytes)[:count]


def _compile(lowered):
  """(the executable, its buffer assignment as text): XLA writes the assignment only to a dump
  directory, so the compile dumps into a temporary one, read and deleted here."""
  with tempfile.TemporaryDirectory() as dump:
    compiled = lowered.compile(compiler_options={"xla_dump_to": dump,
                                                 "xla_dump_hlo_as_text": True})
    found = sorted(pathlib.Path(dump).glob("*after_optimizations-buffer-assignment.txt"))
    return compiled, found[-1].read_text() if found else ""


def lower(config, devices):
  """(the run, its train step lowered) for `devices`: the run builder's step, as training runs
  it, traced for abstract inputs (nothing allocated)."""
  run_lib.check(config)
  run = run_lib.build(config, devices)
  return run, run.lower_train_step()


def compile_plan(config, topology: str, changes: dict | None = None) -> Plan:
  """Compiles config's train step for `topology` (with `changes` applied) and reads the result."""
  config = copy.deepcopy(config)
  config.update_from_flattened_dict(changes or {})
  if not config.model.vocab_size:
    raise UserError("AOT compilation reads no data: set --config.model.vocab_size")
  devices = _tpu_devices(topology)
  chip = hardware.chip_of(devices[0])
  run, lowered = lower(config, devices)
  state, mesh = run.abstract_state, run.mesh
  model_flops = (flops.train_flops_per_token(state.params, config.model) * config.batch_size
                 * config.model.block_size / len(devices))
  plan = functools.partial(Plan, topology=topology, device_kind=devices[0].device_kind,
                           mesh=dict(mesh.shape), changes=dict(changes or {}),
                           hbm_bytes=chip.hbm_bytes if chip else 0,
                           model_flops_per_device=model_flops,
                           scanned=config.model.scan_layers)
  try:
    compiled, buffer_assignment = _compile(lowered)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses programs that exceed HBM; its message says by how much.
    return plan(argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0,
                flops_per_device=float("nan"), collectives={},
                out_of_memory=str(e).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0])
  memory = compiled.memory_analysis()
  hlo_text = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return plan(
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes, hbm_bytes=chip.hbm_bytes if chip else 0,
      flops_per_device=cost["flops"],
      largest_temps=largest_temporaries(buffer_assignment, hlo_text),
      collectives=dict(collections.Counter(COLLECTIVE.findall(hlo_text))))


def alternatives(config) -> list[dict]:
  """Variants to try when a step does not fit, cheapest change first."""
  fsdp = {"mesh.data": 1, "mesh.fsdp": -1}
  options = [fsdp]
  if "remat" in config.model:
    options += [{**fsdp, "model.remat": policy} for policy in ("save_dots", "full")]
  remat = {"model.remat": "full"} if "remat" in config.model else {}
  for factor in (2, 4, 8):
    accum = config.grad_accum_steps * factor
    if config.batch_size % accum == 0:
      options.append({**fsdp, **remat, "grad_accum_steps": accum})
  return options


def _gib(n: int) -> str:
  return f"{n / 2**30:,.2f} GiB"


def _size(n: int) -> str:
  return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def describe(plan: Plan) -> str:
  header = (f"topology {plan.topology}: {math.prod(plan.mesh.values())} × {plan.device_kind}, "
            f"mesh {plan.mesh}")
  if plan.out_of_memory:
    return f"{header}\nDOES NOT FIT: the compiler ran out of HBM: {plan.out_of_memory}"
  collectives = ", ".join(f"{k} ×{v}" for k, v in sorted(plan.collectives.items())) or "none"
  verdict = "FITS" if plan.fits else "DOES NOT FIT"
  return "\n".join([
      header,
      f"per device: arguments (params + optimizer state + batch) {_gib(plan.argument_bytes)}, "
      f"temporaries {_gib(plan.temp_bytes)}, outputs {_gib(plan.output_bytes)} "
      f"({_gib(plan.alias_bytes)} aliased to donated inputs)",
      f"total {_gib(plan.total_bytes)} of {_gib(plan.hbm_bytes)} HBM: {verdict}",
      f"FLOPs per step per device: {plan.model_flops_per_device:.4g} model "
      f"(6·N + 12·L·T·d); XLA cost analysis {plan.flops_per_device:.4g}"
      + (" (counts the scanned layer loop once)" if plan.scanned else ""),
      f"collectives: {collectives}",
      *([f"largest temporaries ({len(plan.largest_temps)}):"] if plan.largest_temps else []),
      *(f"  {_size(b.bytes):>10}  {b.shape}  {b.instruction}" + (f"  ← {b.op}" if b.op else "")
        for b in plan.largest_temps),
  ])


def plan_and_report(config, topology_or_slice: str, print_fn=print) -> Plan:
  topology = topology_name(topology_or_slice)
  plan = compile_plan(config, topology)
  print_fn(describe(plan))
  if not plan.fits:
    print_fn("\nsearching for settings that fit:")
    for changes in alternatives(config):
      flags = " ".join(f"--config.{k}={v}" for k, v in changes.items())
      try:
        candidate = compile_plan(config, topology, changes)
      except sharding.ShardingError:  # e.g. microbatches too small to split over the mesh
        print_fn(f"  n/a     {'(batch split)':>12}  {flags}")
        continue
      size = "(out of HBM)" if candidate.out_of_memory else _gib(candidate.total_bytes)
      print_fn(f"  {'fits   ' if candidate.fits else 'too big'} {size:>12}  {flags}")
  return plan
