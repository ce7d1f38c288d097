"""Connecting to Ray: RAY_ADDRESS if set; otherwise a local head node that ray_finetune starts once and that
outlives the driver (so a run goes on after the script exits). `ray-finetune down` stops it."""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import ray

from ray_finetune import settings as settings_module
from ray_finetune.errors import ConfigError
from ray_finetune.settings import Settings
from ray_finetune.ports import free_ports, why_unreachable

NAMESPACE = "ray_finetune"
HEAD_FILE = "head.json"
TOKEN_FILE = "ray_auth_token"


def _ray_command() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return why_unreachable(host, int(port), timeout_s=1.0) is None


def local_head_address(config: Settings) -> str | None:
    """The address of the head this home started, if it is still up."""
    address = _recorded_address(config)
    return address if address and _reachable(address) else None


def _recorded_address(config: Settings) -> str | None:
    """The address of the head this home started, as recorded when it started (it may have gone since)."""
    record = config.home / HEAD_FILE
    return json.loads(record.read_text())["address"] if record.exists() else None


def _auth_env(config: Settings) -> dict[str, str]:
    """Token authentication for the local head: a secret of this home's, readable by its owner only. A driver or
    worker without it cannot talk to the head."""
    token = config.home / TOKEN_FILE
    if not token.exists():
        config.home.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def _use_token(env: dict[str, str]) -> None:
    """Make this process present the head's token. Ray reads its auth settings once per process (at import), so
    after changing them it must re-read its config and forget any cached token."""
    os.environ.update(env)
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# Ray replaces a loopback --node-ip-address with the machine's address, and its servers then listen on every
# interface, unless told the cluster is single-machine (its switch for laptops, which also refuses worker nodes).
# The local head is one machine by definition: with the switch, Ray advertises 127.0.0.1 and listens on loopback.
SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _stay_on_loopback() -> None:
    """This driver must reach the local head at 127.0.0.1 as well. Ray read the switch when it was imported, so
    its constant is set again here."""
    os.environ.update(SINGLE_MACHINE)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_head(config: Settings) -> str:
    config.home.mkdir(parents=True, exist_ok=True)
    port, agent_port, client_port = free_ports(3)
    cpus = max(os.cpu_count() or 1, 4)  # logical slots: trainer workers + packer; the actors' threads are capped
    # Ray's fixed default ports (agent 52365, client server 10001) collide with any other Ray on the machine.
    command = [
        _ray_command(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
        "--include-dashboard=false", "--disable-usage-stats", f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
    ]
    env = {**os.environ, **config.as_env(), **_auth_env(config), **SINGLE_MACHINE, "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConfigError(f"could not start a local Ray head ({' '.join(command)}):\n{result.stderr[-2000:]}")
    address = f"127.0.0.1:{port}"
    (config.home / HEAD_FILE).write_text(json.dumps({"address": address}))
    return address


def connect() -> Settings:
    """Connect this process to the cluster (starting a local head if needed) and make sure the event store and
    the scheduler exist."""
    config = settings_module.load()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            address = local_head_address(config) or start_local_head(config)
            _use_token(_auth_env(config))
            _stay_on_loopback()
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": _settings_not_set_by_the_job(config)})
    from actors import scheduler
    from eventstore import actor as event_store_actor

    event_store_actor.get_or_create(str(config.event_log_path))
    scheduler.get_or_create()
    return config


def join_if_running() -> bool:
    """Connect when a cluster is up (RAY_ADDRESS, or the local head this home started), without starting one;
    whether this process is connected."""
    if ray.is_initialized():
        return True
    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        host_port = address.split("://")[-1]
        if ":" in host_port and not _reachable(host_port):   # Ray would keep retrying a cluster that is down
            return False
    elif not local_head_address(settings_module.load()):
        return False
    try:
        connect()
    except ConnectionError:   # e.g. RAY_ADDRESS=auto with no Ray running on this machine
        return False
    return True


def _settings_not_set_by_the_job(config: Settings) -> dict[str, str]:
    """The settings actors need, as environment variables. A driver that is itself a submitted Ray job (`ray job
    submit --runtime-env-json ...`) may carry some of them in the job's runtime env already, and Ray refuses the
    same key from both; those are in this process's environment anyway, so they are left to the job."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    from_job = ((job_config.get("runtime_env") or {}).get("env_vars") or {})
    return {key: value for key, value in config.as_env().items() if key not in from_job}


def down() -> bool:
    """Stop the local head this home started, and nothing else: another Ray on this machine (a user's own, or the
    head of another RAY_FINETUNE_HOME) goes on, where `ray stop` would stop every one. Returns whether one was
    running."""
    config = settings_module.load()
    record = config.home / HEAD_FILE
    if ray.is_initialized():
        ray.shutdown()
    was_running = local_head_address(config) is not None
    recorded = _recorded_address(config)
    if recorded:
        stop_head(recorded)
    record.unlink(missing_ok=True)
    return was_running


def head_processes(address: str) -> list[psutil.Process]:
    """The processes on this machine of the Ray head whose GCS listens at `address` (host:port): those whose command
    line names that port (the GCS, raylet, dashboard, monitors, client server) and their descendants (the workers
    and agents, which rename themselves `ray::IDLE`, `ray::DashboardAgent`, ...)."""
    names_the_port = re.compile(rf"[:=]{re.escape(address.rpartition(':')[2])}(?!\d)")
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        # Ray's own programs only: a head that died long ago may have left its port to something else
        if process.pid != os.getpid() and names_the_port.search(command) and re.search(r"\bray\b", command):
            try:
                for member in [process, *process.children(recursive=True)]:
                    found[member.pid] = member
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return list(found.values())


def stop_head(address: str, grace_s: float = 5.0) -> None:
    """Stop the head at `address`, every process of it (see stop_processes)."""
    stop_processes(head_processes(address), grace_s)


def stop_processes(processes: list[psutil.Process], grace_s: float = 5.0) -> None:
    """Ask each process to exit first (SIGTERM, as `ray stop` without --force does), kill those still there after
    `grace_s`. A process this user may not signal (another user's) is left."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.terminate()
    _, still_there = psutil.wait_procs(processes, timeout=grace_s)
    for process in still_there:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.kill()
    psutil.wait_procs(still_there, timeout=grace_s)


@dataclass(frozen=True)
class NodeAnswer:
    address: str            # the node's IP
    node_id: str
    value: Any              # what the function returned there (None when it did not answer)
    failure: str | None     # why it did not answer: no answer in time, or the error it raised


def on_every_node(function: Callable[..., Any], *arguments: Any, within_s: float) -> list[NodeAnswer]:
    """`function(*arguments)` once on every alive node (what only each node can see: its disk, its mounts), as a
    task pinned to the node that takes no CPU, so that a node busy training still answers. A node that does not
    answer within `within_s` is named, not waited for: a hung mount must not hang the command that asks."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [node for node in ray.nodes() if node.get("Alive")]
    task = ray.remote(num_cpus=0)(function)
    asked = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
             .remote(*arguments) for node in alive]
    ready, _ = ray.wait(asked, num_returns=len(asked), timeout=within_s)
    answers = []
    for node, reference in zip(alive, asked):
        value, failure = None, None
        if reference not in ready:
            failure = f"no answer within {within_s:g} s (a hung mount, or a node too busy to start a task)"
            ray.cancel(reference, force=True)   # asked again next time: one stuck task a node, not one a question
        else:
            try:
                value = ray.get(reference)
            except ray.exceptions.RayError as error:
                failure = f"failed: {str(error).strip().splitlines()[0]}"
        answers.append(NodeAnswer(node["NodeManagerAddress"], node["NodeID"], value, failure))
    return answers
