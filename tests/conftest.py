"""Session set-up: one JAX compilation cache for the whole test session, shared with the subprocesses the tests
start. Many tests compile the same training function twice (a run and its resumed or reloaded copy); the cache
serves the second compilation from disk. It changes no number: a cached executable is the same program.

The suite runs on the CPU even on a GPU host (JAX_PLATFORMS=cpu unless set): its device-count tests force host
devices, and its bit-for-bit checks compare CPU programs."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = tempfile.mkdtemp(prefix="jax_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
