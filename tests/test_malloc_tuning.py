"""train.tune_malloc: glibc's mallopt knobs the driver sets at start-up."""

import platform

import pytest

from opd_jax import train


def test_tune_malloc_sets_every_knob_on_glibc():
  if platform.libc_ver()[0] != "glibc":
    pytest.skip("mallopt is glibc's")
  assert train.tune_malloc() is True
  assert [p for p, _ in train._MALLOPT] == [-1, -2, -3]  # trim, top pad, mmap threshold
