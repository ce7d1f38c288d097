"""The scheduler found by name. A driver that lists runs, follows events or cancels one needs only the scheduler's
handle; importing the scheduler's module for it would import what the scheduler drives (the trainer group's torch and
transformers: ~6 s of a 2-core machine, for every `ray-finetune runs list`). Its code is imported only to create it."""
from __future__ import annotations

import ray

from actors.event_sink import NAMESPACE

SCHEDULER_NAME = "ray_finetune_scheduler"


def scheduler() -> "ray.actor.ActorHandle":
    """The cluster's scheduler, created (detached, on the head) if there is none yet."""
    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)
    except ValueError:   # none yet (a fresh cluster): two drivers may both get here; get_or_create makes one
        from actors import scheduler as scheduler_module

        return scheduler_module.get_or_create()
