"""A checkpoint is published in the background: training goes on while its files go up to object storage.

Writing a checkpoint pauses training (every rank writes its DeepSpeed state into its node's mirror, rank 0 adds the
consolidated weights); uploading it need not, and on a cluster it is the longer part (gigabytes of optimizer state
over the network). So the first rank of each node (the one that acts for the node's mirror) uploads what its node
wrote on a thread of its own, and rank 0 completes the checkpoint on the object store once every node's files are
there: its trainer state (whose presence makes a checkpoint complete, checkpoint.is_complete), then the pointer,
then retention of older checkpoints. Only then is it reported: a CHECKPOINT_SAVED event always names a checkpoint
that a resumed run can load. (What retention meets never fails the upload: an older checkpoint the storage refuses to
remove is reported with the new one, and stays.)

Rank 0 learns that the other nodes' files are up at a step boundary, from the value every rank exchanges there
anyway (loop._agree), so the threads need no messages and no polling of their own. At most one checkpoint is in
flight: the next is written only after the last is complete (`finish`), so a node's mirror holds one checkpoint at
a time and the pointer never moves back. On storage that is a shared folder there is nothing to upload: a checkpoint
is complete as soon as it is written, and no thread is started.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ray_finetune import storage
from ray_finetune.errors import CheckpointError, one_line
from ray_finetune.train import checkpoint
from ray_finetune.train.distributed import FolderRole, first_of_its_folder


@dataclass(frozen=True)
class Published:
    """A checkpoint complete on the storage, and what completing it took."""
    path: Path                       # this node's path of it (a mirror path on object storage)
    epoch: int
    step: int
    retention: checkpoint.Retention  # what retention removed after it, and what the storage refused to remove
    write_seconds: float             # training paused while the ranks wrote it
    upload_seconds: float | None     # uploaded while training went on (None: the storage is a folder)


class _Abandoned(Exception):
    """Training failed while rank 0 waited for another node's files: the checkpoint stays incomplete."""


class Publisher:
    """Completes the checkpoints one rank writes. Every rank of the group makes one (together: the ranks learn which
    of them acts for each node) and calls `at_step_boundary` at every step boundary, together."""

    def __init__(self, save_folder: str, run_name: str, rank: int, keep: int,
                 report: Callable[[Published], None], node: FolderRole | None = None) -> None:
        """`node`: this rank's role for its node's mirror (first_of_its_folder of it), worked out here when not
        given (a collective: every rank then makes its Publisher at the same point)."""
        self.directory = checkpoint.checkpoints_dir(save_folder, run_name)
        self.rank, self.keep, self._report = rank, keep, report
        self.background = storage.is_mirrored(self.directory)
        if self.background:
            role = node or first_of_its_folder(str(storage.mirror_root()))
            self._acts_for_node, self._with_rank0, self.nodes = role.first, role.with_rank0, role.folders
        else:   # one folder for all: rank 0 completes what all wrote
            self._acts_for_node, self._with_rank0, self.nodes = rank == 0, True, 1
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._uploading = False                   # this node's files of the checkpoint in flight are not all up yet
        self._others_up = threading.Event()       # rank 0: every other node's files of it are
        self._abandoned = False
        self._published: list[Published] = []     # complete, not reported yet
        self._lock = threading.Lock()

    def staging(self, name: str) -> Path:
        return self.directory / checkpoint.staging_name(name)

    def start(self, name: str, epoch: int, step: int, write_seconds: float) -> None:
        """Every rank, once every rank has written its files of checkpoint `name` into its staging folder. On a
        shared folder rank 0 completes it here (an OSError is the caller's to report, as for the write)."""
        if not self._acts_for_node:
            return
        if self.rank != 0:
            self._in_background(self._push_node_files, name)
            return
        checkpoint.place(self.directory, name)
        if not self.background:   # nothing to upload: complete at once
            self._complete(name, epoch, step, write_seconds)
            self._report_published()
            return
        if self.nodes > 1:
            self._others_up.clear()
        else:
            self._others_up.set()
        self._in_background(self._complete, name, epoch, step, write_seconds)

    def uploading(self) -> bool:
        """Whether this node's files of the checkpoint in flight are still going up (rank 0's node needs no say:
        rank 0 itself completes the checkpoint after them)."""
        return self._uploading and not self._with_rank0

    def at_step_boundary(self, any_node_uploading: bool) -> None:
        """Every rank, together: what every rank learned (`any_node_uploading`, from `uploading()` of each) lets
        rank 0 complete the checkpoint in flight; an upload that failed fails training here; what is complete is
        reported."""
        if not any_node_uploading:
            self._others_up.set()
        self._raise_failed_upload()
        self._report_published()

    def finish(self) -> None:
        """Every rank, together: wait until the checkpoint in flight is complete on the storage, and report it."""
        if not self.background:
            return
        if not self._with_rank0:
            self._join()
        if self.nodes > 1:
            import torch.distributed as dist

            dist.barrier()   # every node's files are up
        if self.rank == 0:
            self._others_up.set()
            self._join()
            self._report_published()

    def after_failure(self) -> None:
        """Training failed: complete the checkpoint in flight when it needs no other node (whose rank may be what
        failed), give it up otherwise, and report what is complete. Never raises: the failure is what training
        fails with."""
        if self.nodes > 1:
            self._abandoned = True
            self._others_up.set()
            return
        try:
            self._join()
            self._report_published()
        except Exception:  # noqa: BLE001 - secondary to the failure being raised
            logging.getLogger(__name__).exception("could not complete the checkpoint in flight of a failed training")

    def _complete(self, name: str, epoch: int, step: int, write_seconds: float) -> None:
        """Rank 0: its node's files up, then (once every other node's are) the trainer state, the pointer,
        retention."""
        started = time.monotonic()
        folder = self.directory / name
        storage.push(folder, last=(checkpoint.STATE_FILE,), before_last=self._wait_for_other_nodes)
        checkpoint.point(self.directory, name)
        uploaded = time.monotonic() - started
        storage.drop_local(folder)   # a node's mirror holds a checkpoint only while it is written or read
        retention = checkpoint.retain(self.directory, self.keep)   # never raises: the checkpoint is complete
        with self._lock:
            self._published.append(Published(folder, epoch, step, retention, write_seconds,
                                             uploaded if self.background else None))

    def _push_node_files(self, name: str) -> None:
        """A node other than rank 0's: its ranks' files, from its staging folder to the checkpoint's place."""
        staging = self.staging(name)
        storage.push(staging, to=self.directory / name)
        storage.drop_local(staging)

    def _wait_for_other_nodes(self) -> None:
        self._others_up.wait()
        if self._abandoned:
            raise _Abandoned()

    def _in_background(self, work: Callable[..., None], name: str, *arguments: object) -> None:
        def run() -> None:
            try:
                work(name, *arguments)
                self._uploading = False   # only when it went up: a node whose upload failed never says it is done
            except _Abandoned:
                pass
            except BaseException as error:  # noqa: BLE001 - handed to the training thread, which fails with it
                self._error = CheckpointError(
                    f"could not upload checkpoint {name} to {storage.location_of(self.directory)}: "
                    f"{one_line(error)} (earlier checkpoints are intact)")
                self._error.__cause__ = error

        self._uploading = True
        self._thread = threading.Thread(target=run, name=f"publish-{name}", daemon=True)
        self._thread.start()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_failed_upload()

    def _raise_failed_upload(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _report_published(self) -> None:
        with self._lock:
            published, self._published = self._published, []
        for done in published:
            self._report(done)
