"""Checkpoints of a run: one Orbax CheckpointManager under ``WORKDIR/checkpoints``.

A checkpoint is an ``ocp.args.Composite`` of two items:

- ``state``: the train state pytree (params, optimizer state, batch
  statistics, step, rng), saved asynchronously with ``StandardSave``;
- ``data``: the grain iterator's position (``grain.checkpoint``), so a resumed
  run sees exactly the batches the uninterrupted run would have seen;
- ``digest``: a CRC-32 of the state, checked on restore.

The manager keeps the last N steps plus the best by the task's validation
score (the metric ``val_score``: ``val_dice_mean`` for segmentation, the
classification score for classification; ``None`` for steps saved between
validations). Checkpoints written before the metric had that name recorded
it as ``val_dice_mean``, which is still read.
Restoring walks from the newest step down: a checkpoint that fails to load
or holds non-finite numbers is moved to ``WORKDIR/checkpoints_corrupt/`` with
a warning and the previous one is tried (a checksum mismatch counts as a failure). It never silently starts over: when
steps exist but none can be read, :class:`CheckpointError` is raised.
"""

from __future__ import annotations

import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train.checkpoint_score import METRIC, pick_step, score_of


class CheckpointError(RuntimeError):
    """No usable checkpoint although the run directory has some."""


class CheckpointFallbackWarning(RuntimeWarning):
    """The newest checkpoint was unreadable; an older one is used."""


def _host_leaves(tree):
    # The train state is replicated: every process holds each whole array.
    for leaf in jax.tree.leaves(tree):
        yield np.ascontiguousarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)


def state_digest(tree) -> str:
    """CRC-32 over every leaf's bytes, in tree order (Orbax itself stores no checksum)."""
    crc = 0
    for data in _host_leaves(tree):
        crc = zlib.crc32(data.view(np.uint8).reshape(-1), crc)
    return f"{crc:08x}"


def _all_finite(tree) -> bool:
    return all(np.all(np.isfinite(d)) for d in _host_leaves(tree) if np.issubdtype(d.dtype, np.inexact))


class Checkpoints:
    """Save / resume a run's train state and data iterator.

    Args:
      directory: the manager's directory (created if needed).
      keep: how many of the newest steps to keep (the best one is kept too).
      async_save: write in a background thread; call :meth:`wait` or
        :meth:`close` before the process exits.
    """

    def __init__(self, directory, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.async_save = async_save
        self._open()

    def _open(self) -> None:
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=self.keep),
                ocp.checkpoint_managers.BestN(get_metric_fn=score_of, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=score_of,  # makes the manager record metrics and answer best_step()
            best_mode="max",
            preservation_policy=policy,
            enable_async_checkpointing=self.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def steps(self) -> list[int]:
        """Committed steps on disk, oldest first."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest validation score (the newest when none was validated), or None."""
        # The writing manager holds every step's score in memory, including a
        # step still being saved in the background; every save records the
        # metric (None between validations), so Orbax's answer is never None
        # while steps exist and follows the same rule as pick_step.
        return self.manager.best_step()

    def save(self, step: int, state: Any, data_iterator=None, *, score: float | None = None) -> bool:
        """Starts saving ``state`` (and the iterator position) as ``step``.

        ``score`` is the task's validation score at this step (None when the
        step was not validated); 'best' picks the step with the highest.

        Returns False when ``step`` is already on disk. The iterator state is
        captured before this returns, so training may continue at once.
        """
        if step in self.manager.all_steps():
            return False
        # The digest lets a restore detect bytes that changed on disk, which
        # would otherwise load silently as wrong numbers.
        items = {"state": ocp.args.StandardSave(state), "digest": ocp.args.JsonSave({"crc32": state_digest(state)})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(
            int(step), args=ocp.args.Composite(**items), metrics={METRIC: score}, force=True
        )

    def _restore_step(self, step: int, abstract_state, data_iterator):
        items = {"state": ocp.args.StandardRestore(abstract_state), "digest": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        if restored["digest"]["crc32"] != state_digest(state):
            raise ValueError("its contents do not match the checksum written with it")
        if not _all_finite(state):
            raise ValueError("it holds non-finite values")
        return state

    def restore_latest(self, abstract_state, data_iterator=None) -> tuple[int, Any] | None:
        """Restores the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with
        ``sharding``) or arrays. ``data_iterator``, when given, is moved to the
        saved position in place. Returns ``(step, state)``, or None when the
        directory holds no checkpoint at all.
        """
        tried = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state = self._restore_step(step, abstract_state, data_iterator)
            except Exception as err:  # any failure to read means: use an older one
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                tried.append(f"{step} ({reason})")
                moved_to = self._quarantine(step)
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} is unreadable ({reason}); "
                    f"moved it to {moved_to}, falling back to the previous checkpoint",
                    CheckpointFallbackWarning,
                    stacklevel=2,
                )
                continue
            if tried:
                self._reopen()
            return step, state
        if tried:
            raise CheckpointError(f"no readable checkpoint in {self.directory}; tried steps {', '.join(tried)}")
        return None

    def _quarantine(self, step: int) -> Path:
        # Moving the step away (instead of deleting it) keeps the evidence and
        # frees the step number for the resumed run to save again.
        destination = self.directory.parent / f"{self.directory.name}_corrupt" / str(step)
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            if destination.exists():
                shutil.rmtree(destination)
            source = self.directory / str(step)
            if source.exists():
                shutil.move(str(source), str(destination))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        return destination

    def _reopen(self) -> None:
        # The manager caches its list of steps; rebuild it after moving some away.
        self.manager.close()
        self._open()

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_arrays(directory, step: int | str = "latest") -> tuple[int, dict]:
    """``(step, tree)``: a saved train state as nested dicts of numpy arrays, on any machine.

    ``step`` is an int, 'latest' or 'best' (highest validation score, else the newest). The
    tree holds ``params``, ``model_state``, ``opt_state``, ``step`` and ``rng``;
    no model, mesh or device layout is needed to read it.
    """
    directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(directory, options=options) as manager:
        try:
            chosen = pick_step(manager, step)
        except LookupError as err:
            raise CheckpointError(str(err)) from None
    path = directory / str(chosen) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return chosen, checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
