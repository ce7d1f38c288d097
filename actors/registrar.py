"""The registrar actor: final checkpoint → final_model/ (HF folder) → MLflow transformers model → registry."""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import ray

from actors.event_sink import EventSink
from actors.messages import RegisterRequest, Registration
from eventstore.schema import EventType
from ray_finetune import settings, tracking
from ray_finetune.errors import RegistrationError
from ray_finetune.train.checkpoint import weights_folder
from ray_finetune.train.models import parameter_count


@ray.remote(num_cpus=0, max_restarts=0)
class Registrar:
    """Started together with the run's data packer: getting ready to register (MLflow's and the model's code
    imported, the tracking store connected) takes seconds, paid while the run trains instead of after it."""

    def __init__(self, base_model: str) -> None:
        try:
            importlib.import_module("mlflow.transformers")   # what logging the model uses
            parameter_count(base_model)   # builds the architecture on the meta device: imports its code, no weights
            tracking.open_store(settings.load())
        except Exception:  # noqa: BLE001 - only a head start: register() meets any real problem and reports it
            pass

    def register(self, request: RegisterRequest) -> Registration:
        run = request.run
        final_model = Path(run.save_folder) / run.run_name / "final_model"
        name = run.spec.destination.full_name(run.run_name)
        try:
            if not final_model.exists():
                staging = final_model.with_name("final_model.tmp")
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(weights_folder("final checkpoint", request.final_checkpoint), staging)
                staging.rename(final_model)
            version = tracking.log_and_register_model(settings.load(), run_id=run.mlflow_run_id,
                                                      model_folder=str(final_model), registered_name=name)
        except Exception as error:   # noqa: BLE001 - the run fails with what to do about it
            cause = " ".join(str(error).split())   # one line: a run's details keep the last line of its error
            raise RegistrationError(
                f"could not register the final model as {name}: {type(error).__name__}: {cause}. Its final "
                f"checkpoint ({Path(str(request.final_checkpoint)).name}) is intact: once the cause is fixed, "
                "resuming the run (fm.resume, `ray-finetune runs resume`) registers it without training again"
            ) from error
        registration = Registration(model_name=name, model_version=version, final_model_path=str(final_model))
        EventSink("registrar", run.run_name).emit(EventType.REGISTERED, f"registered {name} version {version}",
                                                  registration.model_dump())
        return registration
