"""The rolling training checkpoint of a run: written after every epoch, read back by ``resume``.

Artifact stores have no atomic rename (a remote upload killed half-way leaves half a file), so the checkpoint
alternates between two artifact slots and the run's tag ``medzoo.checkpoint`` names the slot last written in
full; the tag moves only after the upload finished. A crash at any moment leaves the previous epoch readable.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import mlflow
import torch

from training.tracking.lifecycle import CHECKPOINT_TAG as SLOT_TAG

CHECKPOINT_DIR = "checkpoint"
SLOTS = ("a.pt", "b.pt")
EPOCH_TAG = "medzoo.checkpoint_epoch"


class CheckpointError(ValueError):
    """A run without a usable checkpoint; the message names the run and what to do."""


class RollingCheckpoint:
    """Writes the state handed to it into the active run's free slot, then points the tag at it."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        current = mlflow.get_run(run_id).data.tags.get(SLOT_TAG)
        self.next_slot = SLOTS[1] if current == SLOTS[0] else SLOTS[0]

    def __call__(self, state: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / self.next_slot
            torch.save(state, path)
            mlflow.MlflowClient().log_artifact(self.run_id, str(path), CHECKPOINT_DIR)
        client = mlflow.MlflowClient()
        client.set_tag(self.run_id, SLOT_TAG, self.next_slot)
        client.set_tag(self.run_id, EPOCH_TAG, str(state["epoch"]))
        self.next_slot = SLOTS[1] if self.next_slot == SLOTS[0] else SLOTS[0]


def load_checkpoint(run_id: str) -> dict:
    """The last complete checkpoint of ``run_id``; CheckpointError when it has none."""
    slot = mlflow.get_run(run_id).data.tags.get(SLOT_TAG)
    if slot not in SLOTS:
        raise CheckpointError(
            f"run {run_id} has no checkpoint: it stopped before its first epoch ended. Start it again instead."
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{slot}", dst_path=tmp
            )
            data = Path(local).read_bytes()
        except (mlflow.exceptions.MlflowException, OSError) as err:
            raise CheckpointError(
                f"run {run_id}: its checkpoint {CHECKPOINT_DIR}/{slot} cannot be read ({err})."
            ) from None
    try:
        # Our own file, written by RollingCheckpoint: it holds numpy RNG state, which weights_only refuses.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same: unusable
        raise CheckpointError(f"run {run_id}: its checkpoint {CHECKPOINT_DIR}/{slot} is corrupt ({err}).") from None
