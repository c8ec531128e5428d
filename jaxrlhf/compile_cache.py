"""A persistent compilation cache, so that a second run of the same command compiles nothing.

XLA compiles every jitted program (the rollout, the train step, the scorer…) the first time it meets
its shapes; on a laptop CPU that is seconds to tens of seconds before the first update. JAX can keep
the compiled executables on disk (``jax_compilation_cache_dir``) keyed by a fingerprint of the
program, its compile options and the backend: a later process that builds the same program loads
it instead of compiling it.

``enable_compile_cache()`` turns that on under ``$JAXRLHF_CACHE/xla`` (default
``~/.cache/jaxrlhf/xla``, or ``$XDG_CACHE_HOME/jaxrlhf/xla``). The CLI calls it for every command
unless ``--no-compile-cache`` is given or the environment sets ``JAXRLHF_COMPILE_CACHE=0`` (the test
suite does, so that tests never write into the user's home).

The cache directory is trusted code: do not point it at a directory others can write to.
"""

from __future__ import annotations

import os

import jax

ENV_DISABLE = "JAXRLHF_COMPILE_CACHE"
"""Set to 0 / false / off / no to make ``enable_compile_cache`` a no-op (the CLI honours it too)."""

ENV_ROOT = "JAXRLHF_CACHE"
"""The root of jaxrlhf's caches; the compilation cache is its ``xla`` subdirectory."""


def default_cache_dir() -> str:
    """``$JAXRLHF_CACHE/xla``, else ``$XDG_CACHE_HOME/jaxrlhf/xla``, else ``~/.cache/jaxrlhf/xla``."""
    root = os.environ.get(ENV_ROOT)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "jaxrlhf")
    return os.path.join(root, "xla")


def compile_cache_disabled_by_env() -> bool:
    """True when ``JAXRLHF_COMPILE_CACHE`` is 0 / false / off / no (case-insensitive)."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() in {"0", "false", "off", "no"}


def enable_compile_cache(path: str | os.PathLike | None = None) -> str | None:
    """Keep every compiled XLA program in ``path`` (default: ``default_cache_dir()``) and reuse it.

    Every program is cached, however quick its compilation (``jax_persistent_cache_min_compile_time_secs
    = 0``): a run compiles dozens of small programs whose seconds add up. Call it before the first
    jitted call of the process; calling it again with another path switches the cache there.

    Returns the cache directory in use, or None when ``JAXRLHF_COMPILE_CACHE=0`` disabled it.
    """
    if compile_cache_disabled_by_env():
        return None
    path = os.path.abspath(os.fspath(path) if path is not None else default_cache_dir())
    os.makedirs(path, exist_ok=True)
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir not in (None, path):
        compilation_cache.reset_cache()  # the cache object is built once per path
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
