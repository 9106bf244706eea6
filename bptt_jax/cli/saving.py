"""Saving and restoring training state: checkpoints of a :class:`~bptt_jax.train.TrainState`,
with orbax-checkpoint (``bptt-jax train``'s ``[checkpoint]`` table).

A checkpoint holds everything a run needs to continue exactly: params, readout, optimizer
state, the carry of the stream, the step and the data key, plus JSON metadata (the config).
Each is a directory ``<dir>/<step>/`` written by orbax's ``CheckpointManager``, which writes
into a temporary directory and renames it into place only once every file is complete, so a
run killed mid-save leaves the previous checkpoints intact and never a partial one under a
step's name. The newest ``keep`` checkpoints are kept.

What holds, and what is checked:

* **One writer per directory.** A :class:`Checkpointer` that may write holds an exclusive
  lock (``fcntl.flock``) on ``<dir>/.bptt_jax.lock`` from its creation to its ``close``;
  a second one, in this process or another, is refused with :class:`CheckpointInUse`. The
  lock dies with its process (a killed run leaves no stale lock). Before each save the steps
  are read afresh from the disk, never from orbax's cache, and an existing complete step is
  never overwritten. On a file system without ``flock`` (some network mounts) there is no
  lock, with a warning.
* **Checksums.** Each checkpoint stores the SHA-256 of every array's bytes (item
  ``checksums``); a restore recomputes them and raises :class:`CheckpointCorrupt` naming
  the step and the array on a mismatch (a bit flip in the data, which orbax's own format
  does not catch for large arrays). An array split over processes (a multi-process run's
  carry) has no whole copy on any process: it is stored without a checksum (``null``) and
  restored unverified; everything single-process, and every replicated array, is covered.
  Checkpoints written before the checksums existed restore unverified.
* **Corrupt or incomplete steps** (no commit marker, an empty directory, a missing item,
  unreadable metadata, data that no longer reads or whose checksum differs) raise
  :class:`CheckpointCorrupt` naming the step when restored by step; restoring the newest
  (``step=None``) skips them with a warning each and restores the newest intact step. A
  broken directory in the way of a save is moved aside to ``<step>.corrupt-<n>`` (never
  deleted; :meth:`Checkpointer.set_aside`), so saving over or past it works.
* **A failed save** (a full disk: ``No space left on device``) removes what it wrote and
  raises :class:`CheckpointSaveError` (an ``OSError``), one line naming the complete steps
  left; nothing partial stays under the step's name.

**Sharded states** (data parallelism, :mod:`bptt_jax.parallel`) are saved as they lie: each
process writes the shards of its own devices (orbax's ``StandardSave``; every process of a
multi-process run calls :meth:`Checkpointer.save`), and a checkpoint holds the global arrays,
not a device layout. A restore places every array as the state it is restored into is placed
(``like``'s shardings): restoring onto another number of devices, or from a sharded run onto
one device, is giving it a ``like`` made there (e.g. ``trainer(..., mesh=new_mesh).init``).
Only process 0 takes the lock and moves broken steps aside.

Example:
  >>> import tempfile, jax, bptt_jax
  >>> from bptt_jax import train
  >>> from bptt_jax.cli import saving
  >>> t = train.trainer(bptt_jax.GRU(4))
  >>> state = t.init(jax.random.key(0), input_size=3, output_size=2, batch_size=2)
  >>> with tempfile.TemporaryDirectory() as d:
  ...     _ = saving.save(d, state, {"note": "hi"})
  ...     restored, meta = saving.restore(d, state)
  >>> meta, bool((restored.params.w_h == state.params.w_h).all())
  ({'note': 'hi'}, True)
"""

from __future__ import annotations

import contextlib
import errno as errno_lib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from bptt_jax.cli import orbax_failures

try:
    import fcntl
except ImportError:  # (Windows: no flock; runs unlocked)
    fcntl = None

#: The lock file a writing :class:`Checkpointer` holds (``flock``) in its directory.
LOCK_FILE = ".bptt_jax.lock"
#: The marker orbax writes into a step directory as the last thing before renaming it.
COMMIT_MARKER = "commit_success.txt"
#: The items every checkpoint of this module holds; newer ones also ``checksums`` (required
#: where the step's ``_CHECKPOINT_METADATA`` lists it).
ITEMS = ("state", "metadata", "signature")
_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")


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


def _digest(x) -> str | None:
    """SHA-256 of an array's bytes (C order), or ``None`` when no process holds it whole."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            return None  # split over processes: no whole copy here
        x = x.addressable_data(0)
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def checksums(state) -> dict[str, str | None]:
    """``{path: sha256 hex digest}`` of every array of a state (its key as raw data), as a
    checkpoint stores them; ``None`` for an array split over processes (not verifiable)."""
    leaves = jax.tree_util.tree_leaves_with_path(_to_disk(state))
    return {jax.tree_util.keystr(p): _digest(x) for p, x in leaves}


class CheckpointMismatch(ValueError):
    """A checkpoint whose arrays do not fit the state it is restored into."""


class CheckpointCorrupt(ValueError):
    """A checkpoint step that is incomplete or whose files changed since they were written.

    Attributes:
      step: the step (the newest one when no step is intact).
      reason: what is wrong with it.
    """

    def __init__(self, message: str, step: int | None = None, reason: str = ""):
        super().__init__(message)
        self.step = step
        self.reason = reason


class CheckpointInUse(ValueError):
    """A checkpoint directory another live :class:`Checkpointer` (another run) writes."""


class CheckpointSaveError(OSError):
    """A save that failed (e.g. a full disk); nothing partial of it is left on disk."""


class Checkpointer:
    """Saves and restores train states in one directory (a thin ``CheckpointManager``).

    Args:
      directory: where the checkpoints go (created if missing, unless ``read_only``).
      keep: how many of the newest checkpoints to keep.
      read_only: only read (no lock, no save, nothing moved): for looking at a directory
        another run may be writing.

    Raises:
      CheckpointInUse: (unless ``read_only``) another live ``Checkpointer``, in this
        process or another, writes ``directory``.
    """

    def __init__(self, directory: str | Path, keep: int = 3, *, read_only: bool = False):
        self.directory = Path(directory).resolve()
        self.read_only = read_only
        self._lock = None
        self._closed = False
        self._primary = jax.process_index() == 0
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self._primary:
                self._lock = self._acquire_lock()
        try:
            with orbax_failures.quiet():
                self._manager = ocp.CheckpointManager(
                    self.directory,
                    options=ocp.CheckpointManagerOptions(
                        max_to_keep=keep, create=not read_only, enable_async_checkpointing=False
                    ),
                )
        except BaseException:
            self._release_lock()
            raise

    # ------------------------------------------------------------------ the lock
    def _acquire_lock(self):
        if fcntl is None:
            return None
        path = self.directory / LOCK_FILE
        f = open(path, "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise CheckpointInUse(
                f"checkpoint: {str(self.directory)!r} is in use by another run ({holder}, "
                f"holding {path.name}): two runs saving into one directory would overwrite "
                "each other's checkpoints; wait for it to end, or use another directory"
            ) from None
        except OSError as e:  # e.g. ENOLCK: a file system without flock
            f.close()
            warnings.warn(
                f"checkpoint: cannot lock {str(path)!r} ({e.strerror}); a second run writing "
                "this directory would not be refused",
                stacklevel=3,
            )
            return None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        return f

    def _release_lock(self):
        if self._lock is not None:
            try:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            finally:
                self._lock.close()
                self._lock = None

    # ------------------------------------------------------------------ steps on disk
    def _step_path(self, step: int) -> Path:
        return self.directory / str(int(step))

    def steps_on_disk(self) -> list[int]:
        """Every step whose name is in the directory (complete, corrupt or incomplete; read
        from the disk now), ascending."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if _STEP_NAME.match(p.name))

    def _reload(self) -> None:
        with orbax_failures.quiet(logging.WARNING):  # (orbax warns of each broken step it lists)
            self._manager.reload()

    def latest_step(self) -> int | None:
        """The newest step in the directory (read from the disk now), or ``None``; it may
        be a corrupt one (:meth:`restore` with ``step=None`` skips those)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """The steps of the checkpoints in the directory, read from the disk now, ascending."""
        self._reload()
        return sorted(self._manager.all_steps())

    def problem(self, step: int) -> str | None:
        """What makes step ``step``'s directory incomplete, found without reading its data
        (no commit marker, an empty directory, unreadable ``_CHECKPOINT_METADATA``, a
        missing item), or ``None``. A step that passes can still fail :meth:`restore`."""
        path = self._step_path(step)
        if not path.exists():
            return "it does not exist"
        if not path.is_dir():
            return "it is not a directory"
        names = {p.name for p in path.iterdir()}
        if not names:
            return "an empty directory"
        if COMMIT_MARKER not in names:
            return f"no commit marker ({COMMIT_MARKER}): its save did not finish"
        items = set(ITEMS)
        if "_CHECKPOINT_METADATA" in names:
            try:
                meta = json.loads((path / "_CHECKPOINT_METADATA").read_text())
            except (ValueError, OSError):
                meta = None
            if not isinstance(meta, dict):
                return "its _CHECKPOINT_METADATA is unreadable"
            handlers = meta.get("item_handlers")
            items |= set(handlers) if isinstance(handlers, dict) else set()
        missing = sorted(i for i in items if not (path / i).is_dir())
        if missing:
            return f"item {missing[0]!r} is missing"
        return None

    def set_aside(self, step: int) -> Path | None:
        """Move step ``step``'s directory to ``<step>.corrupt-<n>`` (the first free ``n``),
        out of orbax's sight and of the way of a save of that step; nothing is deleted.
        Returns the new path (``None`` on processes other than 0, which move nothing)."""
        if self.read_only:
            raise ValueError(f"checkpoint: set_aside({step}): this Checkpointer is read_only")
        new = None
        # every process has looked at the step before process 0 moves it (then they wait)
        ocp.multihost.sync_global_processes(f"bptt_jax_set_aside_{step}_before")
        if self._primary:
            n = 1
            while (self.directory / f"{step}.corrupt-{n}").exists():
                n += 1
            new = self.directory / f"{step}.corrupt-{n}"
            os.replace(self._step_path(step), new)
        ocp.multihost.sync_global_processes(f"bptt_jax_set_aside_{step}_after")
        self._reload()
        return new

    # ------------------------------------------------------------------ save
    def save(self, state, metadata: dict | None = None) -> int:
        """Write ``state`` (and JSON ``metadata``) as the checkpoint of ``state.step``, with
        the SHA-256 of every array (see the module's notes).

        The steps are read from the disk first: a complete checkpoint of that step is never
        overwritten; a broken directory under the step's name is moved aside
        (:meth:`set_aside`).

        Raises:
          FileExistsError: that step has a complete checkpoint already.
          CheckpointSaveError: writing failed (e.g. ``No space left on device``); what was
            written of the step is removed, and the message names the complete steps.
          ValueError: a ``read_only`` Checkpointer.
        """
        if self.read_only:
            raise ValueError(f"checkpoint: save into {str(self.directory)!r}: read_only")
        step = int(state.step)
        self._reload()  # the disk, not orbax's cached step list
        path = self._step_path(step)
        if path.exists() or path.is_symlink():
            if self.problem(step) is None:
                raise FileExistsError(
                    f"checkpoint: step {step} already exists in {self.directory}; a checkpoint "
                    "is never overwritten (delete it first, or save into another directory)"
                )
            self.set_aside(step)
        sums = checksums(state)
        try:
            with orbax_failures.quiet():
                self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(_to_disk(state)),
                        metadata=ocp.args.JsonSave(metadata or {}),
                        signature=ocp.args.JsonSave(signature(state)),
                        checksums=ocp.args.JsonSave(sums),
                    ),
                    force=True,
                )
                self._manager.wait_until_finished()
        except Exception as e:
            self._clean_failed_save(step)
            if not orbax_failures.is_write_error(e):
                raise
            complete = [s for s in self.steps_on_disk() if self.problem(s) is None]
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            why = getattr(e, "strerror", None) or orbax_failures.first_line(e)
            err = CheckpointSaveError(
                f"checkpoint: saving step {step} into {self.directory} failed: {why}{where}; "
                f"nothing of step {step} was left; the intact checkpoints are steps "
                f"{complete}"
                + (f" (a resume continues from step {complete[-1]})" if complete else "")
            )
            err.errno = getattr(e, "errno", None) or errno_lib.ENOSPC
            raise err from None
        return step

    def _clean_failed_save(self, step: int) -> None:
        """Remove what a failed save of ``step`` wrote: its temporary directories, and the
        step's directory if it is there incomplete."""
        with orbax_failures.quiet():
            with contextlib.suppress(Exception):
                self._manager.wait_until_finished()
            orbax_failures.join_writers()
            if self._primary:
                for p in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    shutil.rmtree(p, ignore_errors=True)
                path = self._step_path(step)
                if path.is_dir() and self.problem(step) is not None:
                    shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(Exception):
            self._reload()

    # ------------------------------------------------------------------ restore
    def restore(
        self,
        like,
        step: int | None = None,
        *,
        on_corrupt: Callable[[CheckpointCorrupt], None] | None = None,
    ):
        """``(state, metadata)`` of checkpoint ``step`` (default: the newest intact one).

        Every array is checked against the SHA-256 saved with it.

        Args:
          like: a state of the same structure, shapes and dtypes (e.g. a fresh
            ``trainer.init(...)``); it gives the structure and where each array goes: the
            restored arrays have ``like``'s shardings, on any number of devices (a restore
            onto another device count is a ``like`` from a trainer on the new mesh).
          step: the step; ``None``: the newest step that restores intact, skipping newer
            corrupt ones.
          on_corrupt: with ``step=None``, called with each corrupt step's
            :class:`CheckpointCorrupt` as it is skipped (default: a ``UserWarning``).

        Raises:
          FileNotFoundError: no checkpoint (of that step) in the directory.
          CheckpointMismatch: the checkpoint's arrays differ from ``like``'s in structure,
            shape or dtype (another model size, optimizer or batch size).
          CheckpointCorrupt: step ``step`` is incomplete or its data changed (naming the
            step and, for data, the array); with ``step=None``, no step is intact.
        """
        if step is not None:
            return self._restore(like, int(step))
        steps = self.steps_on_disk()
        if not steps:
            raise FileNotFoundError(f"checkpoint: no checkpoint in {self.directory}")
        bad = []
        for s in reversed(steps):
            try:
                return self._restore(like, s)
            except CheckpointCorrupt as e:
                bad.append(e)
                if on_corrupt is None:
                    warnings.warn(f"{e}; skipped", stacklevel=2)
                else:
                    on_corrupt(e)
        raise CheckpointCorrupt(
            f"checkpoint: no intact checkpoint in {self.directory}: "
            + "; ".join(f"step {e.step}: {e.reason}" for e in bad),
            steps[-1],
            bad[0].reason,
        )

    def _corrupt(self, step: int, reason: str) -> CheckpointCorrupt:
        return CheckpointCorrupt(
            f"checkpoint: step {step} in {self.directory} is corrupt or incomplete: {reason}",
            step,
            reason,
        )

    def _restore(self, like, step: int):
        if not self._step_path(step).exists():
            raise FileNotFoundError(f"checkpoint: no checkpoint (step={step}) in {self.directory}")
        problem = self.problem(step)
        if problem is not None:
            raise self._corrupt(step, problem)
        try:
            with orbax_failures.quiet():
                saved = self._manager.restore(
                    step, args=ocp.args.Composite(signature=ocp.args.JsonRestore())
                )["signature"]
        except Exception as e:
            if not orbax_failures.is_read_error(e):
                raise
            raise self._corrupt(
                step, f"item 'signature' unreadable ({orbax_failures.first_line(e)})"
            ) from None
        expected = signature(like)
        if saved is not None and not isinstance(saved, list):
            raise self._corrupt(step, "item 'signature' is not a list")
        if saved is not None and list(saved) != expected:
            diff = [f"{a!r} != {b!r}" for a, b in zip(saved, expected) if a != b]
            raise CheckpointMismatch(
                f"checkpoint: step {step} in {self.directory} does not fit the state to restore "
                f"({len(saved)} vs {len(expected)} arrays; first difference, saved != wanted: "
                f"{diff[0] if diff else 'the number of arrays'})"
            )
        items = dict(
            state=ocp.args.StandardRestore(_target(like)),
            metadata=ocp.args.JsonRestore(),
        )
        has_sums = (self._step_path(step) / "checksums").is_dir()
        if has_sums:
            items["checksums"] = ocp.args.JsonRestore()
        try:
            with orbax_failures.quiet():
                out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if not orbax_failures.is_read_error(e):
                raise
            raise self._corrupt(
                step, f"its data does not read ({orbax_failures.first_line(e)})"
            ) from None
        restored = out["state"]
        # orbax hands back NamedTuples as the target's type; rebuild to be sure of it
        restored = jax.tree.unflatten(jax.tree.structure(_to_disk(like)), jax.tree.leaves(restored))
        if has_sums:
            self._verify(step, restored, out["checksums"])
        impl = jax.random.key_impl(like.key)
        state = restored._replace(key=jax.random.wrap_key_data(restored.key, impl=impl))
        return state, dict(out["metadata"] or {})

    def _verify(self, step: int, restored, saved) -> None:
        """Each restored array's SHA-256 against the saved one (``restored`` in disk form)."""
        if not isinstance(saved, dict):
            raise self._corrupt(step, "item 'checksums' is not a mapping")
        for p, x in jax.tree_util.tree_leaves_with_path(restored):
            path = jax.tree_util.keystr(p)
            want = saved.get(path)
            if want is None:
                continue  # split over processes when saved: not verifiable
            got = _digest(x)
            if got is not None and got != want:
                raise self._corrupt(
                    step,
                    f"array {path} does not match its saved checksum (sha256 {got[:12]}... != "
                    f"{want[:12]}...): its data changed on disk",
                )

    def close(self) -> None:
        """Close orbax's manager and release the directory's lock (again: nothing)."""
        try:
            if not self._closed:
                self._closed = True
                self._manager.close()
        finally:
            self._release_lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save(directory: str | Path, state, metadata: dict | None = None, keep: int = 3) -> int:
    """Save ``state`` as checkpoint ``state.step`` in ``directory``; returns the step.
    See :meth:`Checkpointer.save` (it takes the directory's lock for the save)."""
    with Checkpointer(directory, keep) as c:
        return c.save(state, metadata)


def restore(directory: str | Path, like, step: int | None = None):
    """``(state, metadata)`` from ``directory`` (the newest intact step by default); see
    :meth:`Checkpointer.restore`. Only reads: it works while another run writes there."""
    if not Path(directory).is_dir():  # (a Checkpointer would create it)
        raise FileNotFoundError(f"checkpoint: no directory {str(directory)!r}")
    with Checkpointer(directory, read_only=True) as c:
        return c.restore(like, step)


def latest_step(directory: str | Path) -> int | None:
    """The newest checkpoint's step in ``directory``, or ``None`` (also if it is missing)."""
    if not Path(directory).is_dir():
        return None
    with Checkpointer(directory, read_only=True) as c:
        return c.latest_step()
