"""Checkpoints of a :class:`~bptt_jax.train.TrainState`, with orbax-checkpoint.

A checkpoint holds everything a run needs to continue exactly: params, readout, optimizer
state, the carry of the stream, the step and the data key, plus JSON metadata (the config).
Each is a directory ``<dir>/<step>/`` written by orbax's ``CheckpointManager``, which writes
into a temporary directory and renames it into place only once every file is complete, so a
run killed mid-save leaves the previous checkpoints intact and never a partial one under a
step's name. The newest ``keep`` checkpoints are kept.

**Sharded states** (data parallelism, :mod:`bptt_jax.parallel`) are saved as they lie: each
process writes the shards of its own devices (orbax's ``StandardSave``; every process of a
multi-process run calls :meth:`Checkpointer.save`), and a checkpoint holds the global arrays,
not a device layout. A restore places every array as the state it is restored into is placed
(``like``'s shardings): restoring onto another number of devices, or from a sharded run onto
one device, is giving it a ``like`` made there (e.g. ``trainer(..., mesh=new_mesh).init``).

Example:
  >>> import tempfile, jax, bptt_jax
  >>> from bptt_jax import checkpoint, train
  >>> t = train.trainer(bptt_jax.GRU(4))
  >>> state = t.init(jax.random.key(0), input_size=3, output_size=2, batch_size=2)
  >>> with tempfile.TemporaryDirectory() as d:
  ...     _ = checkpoint.save(d, state, {"note": "hi"})
  ...     restored, meta = checkpoint.restore(d, state)
  >>> meta, bool((restored.params.w_h == state.params.w_h).all())
  ({'note': 'hi'}, True)
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


def _to_disk(state):
    """Typed PRNG keys as their raw ``uint32`` data (orbax stores plain arrays)."""
    return state._replace(key=jax.random.key_data(state.key))


def _target(like):
    """The abstract arrays to restore into: ``like``'s shapes, dtypes and shardings."""
    return jax.tree.map(  # a host (NumPy) leaf has no sharding: JAX's default placement
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        _to_disk(like),
    )


def signature(state) -> list[str]:
    """Every leaf of a state as ``"path: shape dtype"``: what a checkpoint must match."""
    leaves = jax.tree_util.tree_leaves_with_path(_to_disk(state))
    return [f"{jax.tree_util.keystr(p)}: {tuple(x.shape)} {x.dtype}" for p, x in leaves]


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays do not fit the state it is restored into."""


class Checkpointer:
    """Saves and restores train states in one directory (a thin ``CheckpointManager``).

    Args:
      directory: where the checkpoints go (created if missing).
      keep: how many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).resolve()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state, metadata: dict | None = None) -> int:
        """Write ``state`` (and JSON ``metadata``) as the checkpoint of ``state.step``.

        Raises:
          FileExistsError: that step has a checkpoint already.
        """
        step = int(state.step)
        if step in self._manager.all_steps():
            raise FileExistsError(
                f"checkpoint: step {step} already exists in {self.directory}; a checkpoint is "
                "never overwritten (delete it first, or save into another directory)"
            )
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_disk(state)),
                metadata=ocp.args.JsonSave(metadata or {}),
                signature=ocp.args.JsonSave(signature(state)),
            ),
            force=True,
        )
        self._manager.wait_until_finished()
        return step

    def restore(self, like, step: int | None = None):
        """``(state, metadata)`` of checkpoint ``step`` (default: the newest).

        Args:
          like: a state of the same structure, shapes and dtypes (e.g. a fresh
            ``trainer.init(...)``); it gives the structure and where each array goes: the
            restored arrays have ``like``'s shardings, on any number of devices (a restore
            onto another device count is a ``like`` from a trainer on the new mesh).

        Raises:
          FileNotFoundError: no checkpoint (of that step) in the directory.
          CheckpointMismatch: the checkpoint's arrays differ from ``like``'s in structure,
            shape or dtype (another model size, optimizer or batch size).
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"checkpoint: no checkpoint (step={step}) in {self.directory}")
        saved = self._manager.restore(
            step, args=ocp.args.Composite(signature=ocp.args.JsonRestore())
        )["signature"]
        expected = signature(like)
        if saved is not None and list(saved) != expected:
            diff = [f"{a!r} != {b!r}" for a, b in zip(saved, expected) if a != b]
            raise CheckpointMismatch(
                f"checkpoint: step {step} in {self.directory} does not fit the state to restore "
                f"({len(saved)} vs {len(expected)} arrays; first difference, saved != wanted: "
                f"{diff[0] if diff else 'the number of arrays'})"
            )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_target(like)),
                metadata=ocp.args.JsonRestore(),
            ),
        )
        restored = out["state"]
        # orbax hands back NamedTuples as the target's type; rebuild to be sure of it
        restored = jax.tree.unflatten(jax.tree.structure(_to_disk(like)), jax.tree.leaves(restored))
        impl = jax.random.key_impl(like.key)
        state = restored._replace(key=jax.random.wrap_key_data(restored.key, impl=impl))
        return state, dict(out["metadata"] or {})

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save(directory: str | Path, state, metadata: dict | None = None, keep: int = 3) -> int:
    """Save ``state`` as checkpoint ``state.step`` in ``directory``; returns the step."""
    with Checkpointer(directory, keep) as c:
        return c.save(state, metadata)


def restore(directory: str | Path, like, step: int | None = None):
    """``(state, metadata)`` from ``directory`` (newest step by default); see
    :meth:`Checkpointer.restore`."""
    if not Path(directory).is_dir():  # (a Checkpointer would create it)
        raise FileNotFoundError(f"checkpoint: no directory {str(directory)!r}")
    with Checkpointer(directory) as c:
        return c.restore(like, step)


def latest_step(directory: str | Path) -> int | None:
    """The newest checkpoint's step in ``directory``, or ``None`` (also if it is missing)."""
    if not Path(directory).is_dir():
        return None
    with Checkpointer(directory) as c:
        return c.latest_step()
