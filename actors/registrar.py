"""The registrar actor: final checkpoint → final_model/ (HF folder) → MLflow transformers model → registry."""
from __future__ import annotations

import importlib
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import ray

from actors.event_sink import EventSink, one_per_cluster
from actors.messages import RegisterRequest, Registration
from eventstore.schema import EventType
from ray_finetune import settings, storage, tracking
from ray_finetune.errors import RegistrationError, one_line
from ray_finetune.train.checkpoint import weights_folder
from ray_finetune.train.models import parameter_count

ACTOR_NAME = "ray_finetune_registrar"
# Registrations at once, a thread each (MLflow keeps the active run per thread). Each loads its model to log it.
MAX_CONCURRENT_REGISTRATIONS = 8
# The models of the registrations running at once take at most this share of the memory the head has for them.
MEMORY_SHARE = 0.5
RECHECK_MEMORY_S = 5.0   # the head's free memory also changes with what else runs there
FLOAT32_BYTES = 4        # a registration loads its model in fp32 (models.load_model)


class MemoryGate:
    """Registrations go ahead together while their models fit in the head's memory. Each loads its whole model to
    log it, and a head can hold the models of fewer runs than end at once: eight runs of an 8B model finishing
    together would load 256 GB, and the kernel would kill the head's processes, the scheduler among them. One
    registration always goes ahead, whatever its size."""

    def __init__(self, available_bytes: Callable[[], int]) -> None:
        self._available_bytes = available_bytes
        self._changed = threading.Condition()
        self._held = 0   # bytes of the models of the registrations going on

    @contextmanager
    def holding(self, model_bytes: int) -> Iterator[float]:
        """Waits until the model fits beside those being registered; yields the seconds it waited."""
        started = time.monotonic()
        with self._changed:
            # What is held may not be loaded yet: it counts as used, whether or not the memory is still free.
            while self._held and self._held + model_bytes > MEMORY_SHARE * (self._available_bytes() + self._held):
                self._changed.wait(RECHECK_MEMORY_S)
            self._held += model_bytes
        try:
            yield time.monotonic() - started
        finally:
            with self._changed:
                self._held -= model_bytes
                self._changed.notify_all()


# If its process dies, Ray starts it again; a registration it was running fails, and its run is requeued and
# resumed, which registers the final checkpoint without training again, as for any other interruption.
@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=MAX_CONCURRENT_REGISTRATIONS)
class Registrar:
    """One per cluster (named, detached, on the head node like the scheduler), started with the scheduler. Getting
    ready to register (MLflow's code imported, the tracking store connected) takes seconds of CPU: a registrar per
    run paid them while its run's trainers started, three fresh processes importing at once on a small machine
    (BENCHMARKS.md); this one pays them once."""

    def __init__(self) -> None:
        # Imported here: hardware imports torch, and the scheduler's module (which the CLI loads) imports this one.
        from ray_finetune.train.hardware import host_memory

        self._memory = MemoryGate(lambda: host_memory()[1])
        try:
            importlib.import_module("mlflow.transformers")   # what logging the model uses
        except Exception:  # noqa: BLE001 - only a head start: register() meets any real problem and reports it
            pass

    def prepare(self, base_model: str) -> None:
        """Get ready for a run while it packs and trains: the tracking store connected (not when this actor starts:
        a fresh store's schema is then being created by the scheduler's first run) and the code of the run's model
        imported (its architecture built on the meta device: no weights). Cheap for a model seen before."""
        try:
            tracking.open_store(settings.load())
            parameter_count(base_model)
        except Exception:  # noqa: BLE001 - only a head start: register() meets any real problem and reports it
            pass

    def register(self, request: RegisterRequest) -> Registration:
        run = request.run
        final_model = storage.local(run.save_folder) / run.run_name / "final_model"
        name = run.spec.destination.full_name(run.run_name)
        try:
            if not final_model.exists():
                staging = final_model.with_name("final_model.tmp")
                shutil.rmtree(staging, ignore_errors=True)
                weights = storage.pull(weights_folder("final checkpoint", request.final_checkpoint))
                shutil.copytree(weights, staging)
                staging.rename(final_model)
                storage.drop_local(weights)   # if this node pulled it: the bucket has it
            storage.push(final_model)   # on object storage (again, on a retry: the upload may not have finished)
            with self._memory.holding(FLOAT32_BYTES * parameter_count(final_model)) as waited_s:
                version = tracking.log_and_register_model(settings.load(), run_id=run.mlflow_run_id,
                                                          model_folder=str(final_model), registered_name=name)
            storage.drop_local(final_model)   # on object storage: registered from the bucket's copy now
        except Exception as error:   # noqa: BLE001 - the run fails with what to do about it
            raise RegistrationError(   # one line: a run's details keep the last line of its error
                f"could not register the final model as {name}: {one_line(error)}. Its final "
                f"checkpoint ({Path(str(request.final_checkpoint)).name}) is intact: once the cause is fixed, "
                "resuming the run (fm.resume, `ray-finetune runs resume`) registers it without training again"
            ) from error
        registration = Registration(model_name=name, model_version=version,
                                    final_model_path=storage.location_of(final_model),
                                    memory_wait_s=round(waited_s, 3))
        EventSink("registrar", run.run_name).emit(
            EventType.REGISTERED, f"registered {name} version {version}" + (
                f" (waited {waited_s:.0f} s for memory: other runs' models were being registered)"
                if waited_s >= 1 else ""), registration.model_dump())
        return registration


def get_or_create() -> "ray.actor.ActorHandle":
    return one_per_cluster(Registrar, ACTOR_NAME)
