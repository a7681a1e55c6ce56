"""bigflax/hardware.py: the datasheet lookup and the CPU host allocator setting."""

import ctypes
import resource

import jax
import pytest

from bigflax import hardware

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)


def faults_of_a_fresh_block() -> int:
  """Minor page faults taken to malloc, touch and free a BLOCK-sized block."""
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(BLOCK)
  ctypes.memset(block, 1, BLOCK)
  libc.free(block)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_cpu_has_no_datasheet_and_tpus_do():
  assert hardware.chip_of(jax.devices()[0]) is None
  assert hardware.CHIPS["v5p"].hbm_bytes == 95 * hardware.GiB


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"), reason="needs glibc")
def test_freed_host_memory_is_reused_without_page_faults():
  # The first block may be mmap'd fresh (other tests may already have applied the setting), but
  # once it is applied a block freed and allocated again is the same mapped memory.
  assert hardware.keep_freed_host_memory()
  faults_of_a_fresh_block()
  assert faults_of_a_fresh_block() < BLOCK // 4096 // 100  # vs 16,384 pages mapped afresh
