"""Test configuration: eight forced CPU devices (for pmap/shard_map tests), float32 everywhere."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# No persistent XLA cache in tests: nothing written under ~ (tests that need one give a directory).
os.environ.setdefault("JAXRLHF_COMPILE_CACHE", "0")

import pytest


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop jit's compiled programs after each test module. One process runs the whole suite, and
    every XLA CPU executable keeps its memory mappings while cached: ~1,000 tests' worth of programs
    ran into the kernel's per-process mapping limit (vm.max_map_count) and crashed a late compile."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    if os.path.exists("/proc/self/maps") and os.environ.get("JAXRLHF_TEST_MAPS"):
        with open("/proc/self/maps") as maps, open(os.environ["JAXRLHF_TEST_MAPS"], "a") as log:
            log.write(f"{sum(1 for _ in maps)}\n")
