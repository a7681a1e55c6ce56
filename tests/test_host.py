"""bigflax/host.py: the platform JAX computes on, and the C heap keeping freed memory."""

import ctypes
import os
import resource
import subprocess
import sys

import pytest

from bigflax import host

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


@pytest.mark.parametrize("platforms, cpu", [("cpu", True), ("cuda,cpu", False), ("tpu", False)])
def test_the_chosen_platform_decides_whether_jax_computes_on_the_cpu(monkeypatch, platforms, cpu):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host.computes_on_cpu() is cpu


def test_importing_bigflax_on_a_cpu_host_keeps_freed_memory():
  if not host.keep_freed_memory():  # no glibc (macOS, musl): the setting is a no-op there
    assert not hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    return
  # In a fresh process: before the import a freed 64 MiB block is unmapped and the next one
  # faults its 16,384 pages in afresh; after it, the same mapped memory comes back.
  script = ("import test_host as t; before = t.faults_of_a_fresh_block(); import bigflax; "
            "t.faults_of_a_fresh_block(); print(before, t.faults_of_a_fresh_block())")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(__file__))
  before, after = map(int, subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                          capture_output=True, text=True).stdout.split())
  assert before > BLOCK // 4096 // 2
  assert after < BLOCK // 4096 // 100
