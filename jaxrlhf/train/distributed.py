"""Several processes, one program: ``jax.distributed`` start-up and what only one process does.

JAX is multi-controller: every process (one per host, e.g. per TPU VM worker) runs the same program
on its own devices, and ``jax.devices()`` lists the devices of all of them. Arrays on a mesh that
spans processes are global: each process holds only its shards. So the trainers need just two
things from here, and one from ``models.sharding``:

* :func:`initialize` before any JAX computation (the CLI calls it first thing);
* :func:`is_main` — metrics, reports and exported models are written by process 0 only
  (checkpoints are written by all processes together, as orbax does it);
* ``models.sharding.host_copy`` — a whole (gathered) copy of sharded parameters for export; every
  process must call it, since gathering is a collective (``save_pretrained`` does).

On CPU the processes talk through gloo, which is how this is tested on one machine
(``tests/test_distributed.py``: two processes × 4 CPU devices = one 8-device mesh).
"""

from __future__ import annotations

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Start ``jax.distributed`` (True) or do nothing for a single process (False).

    Give all three of ``coordinator_address`` ("HOST:PORT", process 0's host), ``num_processes``
    and ``process_id``, or ``auto=True`` on a Cloud TPU VM / SLURM cluster, where JAX finds them.
    Must run before anything touches a device.
    """
    given = [coordinator_address, num_processes, process_id]
    if not auto and all(v is None for v in given):
        return False
    if not auto and any(v is None for v in given):
        raise ValueError(
            "--coordinator-address, --num-processes and --process-id go together (or use "
            "--distributed alone on a TPU VM, where JAX detects them)"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def is_main() -> bool:
    """True in process 0 (the one that writes metrics, reports and exported models)."""
    return jax.process_index() == 0
