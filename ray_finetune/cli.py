"""The command line: `ray-finetune create|estimate|runs|data|events|checkpoints|models|sql|status|down`
(Typer + Rich)."""
from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ray_finetune.errors import RayFinetuneError, one_line

if TYPE_CHECKING:
    from ray_finetune.cluster import NodeAnswer
    from ray_finetune.data.cache import CacheEntry

app = typer.Typer(help="Fine-tune foundation models on Ray (Databricks FM fine-tuning API compatible).",
                  no_args_is_help=True, pretty_exceptions_enable=False)
runs_app = typer.Typer(help="List, inspect, cancel and delete runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
console = Console()
errors = Console(stderr=True)
# `data cache --clear` waits this long for each node to remove its copies (gigabytes may take a while to delete),
# then names the nodes that have not answered instead of waiting for a hung mount.
CLEAR_NODE_WITHIN_S = 120.0


def _fm():
    from ray_finetune import foundation_model

    return foundation_model


def _guarded(action: Callable[[], Any]) -> Any:
    """User errors become one red line and exit code 2, never a traceback."""
    from ray_finetune.errors import RunNotFoundError, ValidationError

    try:
        return action()
    except ValidationError as error:
        errors.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    except RunNotFoundError as error:
        errors.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(1) from None
    except RayFinetuneError as error:
        errors.print(f"[red]error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(1) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "value") and not isinstance(value, (str, int, float)):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(value), indent=2) + "\n")


SHORT_VALUE = len("2026-12-06 04:59:24")   # a status, a time, a count: read wrong when cut ("COMPLE…")
NARROWEST_TEXT = 24                         # what a column of longer text needs to wrap into readable lines


def _table(title: str | None, columns: list[str], rows: list[list[Any]], *, droppable: tuple[str, ...] = ()) -> None:
    """A table that stays readable at any terminal width: the first column (names that get copied into the next
    command) and short values are never cut, longer text wraps (a word too long for its column folded), and when
    even that does not fit, the `droppable` columns go, in that order, with a line saying which."""
    cells = [["" if v is None else (v.strftime("%Y-%m-%d %H:%M:%S") if isinstance(v, datetime)
                                    else str(getattr(v, "value", v))) for v in row] for row in rows]
    widths = {column: max([len(column)] + [len(row[index]) for row in cells]) for index, column in enumerate(columns)}
    uncut = {column for index, column in enumerate(columns) if index == 0 or widths[column] <= SHORT_VALUE}

    def narrowest(shown: list[str]) -> int:   # borders and padding: 3 a column and 1
        return sum(widths[c] if c in uncut else min(widths[c], NARROWEST_TEXT) for c in shown) + 3 * len(shown) + 1

    shown = list(columns)
    for column in droppable:
        if narrowest(shown) <= console.width:
            break
        shown.remove(column)
    table = Table(title=title)
    for column in shown:
        if column in uncut:
            table.add_column(column, no_wrap=True, min_width=widths[column])
        else:
            table.add_column(column, overflow="fold")
    for row in cells:
        table.add_row(*(value for column, value in zip(columns, row) if column in shown))
    console.print(table)
    left_out = [column for column in columns if column not in shown]
    if left_out:
        console.print(f"[dim]{', '.join(left_out)} left out at this width ({console.width} columns); --json shows "
                      f"every field[/dim]", soft_wrap=True)


@app.command()
def create(
    model: str = typer.Option(..., help="HF model id, local HF folder, or .gguf file"),
    train_data_path: str = typer.Option(..., help=".jsonl file, or a folder of .txt for CONTINUED_PRETRAIN"),
    register_to: str = typer.Option(..., help="catalog.schema or catalog.schema.model_name"),
    task_type: str = typer.Option("CHAT_COMPLETION"),
    eval_data_path: Optional[str] = typer.Option(None),
    eval_prompt: list[str] = typer.Option([], "--eval-prompt", "--eval-prompts",
                                          help="repeat for several prompts"),
    training_duration: Optional[str] = typer.Option(None, help="e.g. 2ep, 500ba, 1_000_000tok"),
    learning_rate: Optional[float] = typer.Option(None),
    context_length: Optional[int] = typer.Option(None),
    experiment_path: Optional[str] = typer.Option(None),
    custom_weights_path: Optional[str] = typer.Option(None),
    validate_inputs: bool = typer.Option(True, "--validate-inputs/--no-validate-inputs"),
    checkpoint_interval: Optional[str] = typer.Option(None, help="e.g. 1ep (default) or 50ba"),
    checkpoints_to_keep: Optional[int] = typer.Option(None, help="the newest N checkpoints are kept (default 3; the "
                                                                 "final one is the newest)"),
    wait: bool = typer.Option(False, "--wait", help="follow the run with a progress bar until it ends"),
    dry_run: bool = typer.Option(False, "--dry-run", help="estimate tokens, steps and time; queue nothing"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Queue a fine-tuning run (with --dry-run: estimate it instead)."""
    arguments = dict(
        model=model, train_data_path=train_data_path, register_to=register_to, task_type=task_type,
        eval_data_path=eval_data_path, eval_prompts=eval_prompt or None, training_duration=training_duration,
        learning_rate=learning_rate, context_length=context_length, experiment_path=experiment_path,
        custom_weights_path=custom_weights_path, validate_inputs=validate_inputs,
        checkpoint_interval=checkpoint_interval, checkpoints_to_keep=checkpoints_to_keep,
    )
    if dry_run:
        _without_library_progress_bars()
        with errors.status("validating the data…") as status:
            result = _guarded(lambda: _fm().estimate(**arguments, progress=status.update))
        _print_json(result.as_dict()) if as_json else console.print(str(result))
        return
    run = _guarded(lambda: _fm().create(**arguments))
    if not wait:
        if as_json:
            _print_json(_run_dict(run))
        else:
            console.print(f"created [bold]{run.name}[/bold] ({run.status.value}); follow it with "
                          f"`ray-finetune events {run.name} --follow`")
        return
    _follow_to_the_end(run.name, as_json)


def _without_library_progress_bars() -> None:
    """The spinner says what a dry run is doing; transformers' own bars (loading the probe's weights) would draw
    through it. This process is the CLI's, so turning them off changes nobody's notebook."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _follow_to_the_end(name: str, as_json: bool, since_resumed: bool = False) -> None:
    """Follow a run with a progress bar, print how it ended, and exit 1 unless it completed."""
    final = _follow_with_progress(name, since_resumed)
    if as_json:
        _print_json(_run_dict(final))
    else:
        console.print(f"{final.name}: [bold]{final.status.value}[/bold]" + (f" — {final.details}" if final.details else ""))
    if final.status.value != "COMPLETED":
        raise typer.Exit(1)


def _as_dry_run(command: Callable[..., None]) -> Callable[..., None]:
    """`ray-finetune estimate ...` is `create --dry-run`: the same options from one definition."""
    @functools.wraps(command)
    def estimate(**options: Any) -> None:
        command(**options, dry_run=True, wait=False)

    def as_estimated(parameter: inspect.Parameter) -> inspect.Parameter:
        if parameter.name != "register_to":
            return parameter
        # A dry run registers nothing, so it does not need to be told where to (as fm.estimate does not).
        return parameter.replace(annotation=Optional[str], default=typer.Option(
            None, help="catalog.schema or catalog.schema.model_name (checked when given)"))

    signature = inspect.signature(command)
    estimate.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[as_estimated(p) for name, p in signature.parameters.items() if name not in ("dry_run", "wait")])
    return estimate


app.command("estimate", help="Dry run: tokens, packing, steps and an estimated time; queues nothing.")(
    _as_dry_run(create))

data_app = typer.Typer(help="Check training data before a run; see and clear the packed-data cache.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    path: str,
    task_type: str = typer.Option("CHAT_COMPLETION"),
    data_prep_cluster_id: Optional[str] = typer.Option(None),
) -> None:
    """Validate every record of a data path (any supported form) for a task type."""
    from ray_finetune.data.validation import check_data

    count = _guarded(lambda: check_data("path", path, task_type, data_prep_cluster_id))
    console.print(f"{path}: {count:,} {'files' if task_type == 'CONTINUED_PRETRAIN' else 'records'}, all valid "
                  f"for {task_type}", soft_wrap=True)   # one line, whatever the path's length: greppable


@data_app.command("cache")
def data_cache(
    clear: bool = typer.Option(False, "--clear", help="remove the entries no run under way reads"),
    unused_days: float = typer.Option(0.0, "--unused-days", min=0.0,
                                      help="with --clear: only entries no run has asked for in this many days"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Packed data cached on RAY_FINETUNE_STORAGE (16 bytes a token): each entry's size, when a run last asked
    for it and which runs under way read it; --clear removes the others (a run that needs one again packs it
    again), and on object storage also the copies of them that trainers pulled to their nodes. Incomplete entries
    (being packed, or left by a packer or a removal cut short) are listed too, and cleared once an hour quiet."""
    from ray_finetune import settings, storage
    from ray_finetune.data import cache

    config = settings.load()
    cache_dir = config.packed_data_dir
    try:
        found = cache.entries(cache_dir)
    except Exception as error:  # noqa: BLE001 - no route, no credentials: the store client's own errors
        errors.print(f"[red]error:[/red] could not list {storage.location_of(cache_dir)}: {one_line(error)}. "
                     f"{storage.reach_advice(config.storage)}", soft_wrap=True)
        raise typer.Exit(1) from None
    # no run reads an incomplete entry: the event log (and so the cluster) is asked only when there are others
    users = _guarded(cache.in_use_by_runs) if any(e.complete for e in found) else {}
    doomed = cache.removable(found, set(users), unused_days * 86400.0) if clear else []
    refused: dict[str, str] = {}   # entry key -> why the storage would not remove it
    for entry in doomed:
        try:
            cache.remove(cache_dir, entry)
        except Exception as error:  # noqa: BLE001 - as retention: OSError, or the store client's own (no credentials)
            refused[entry.key] = one_line(error)
    removed = [e for e in doomed if e.key not in refused]
    nodes = _drop_node_copies(cache_dir, frozenset(e.key for e in found if e not in removed)) if clear else []
    if as_json:
        _print_json({"entries": [{**asdict(e), "in_use_by": users.get(e.key, []), "removed": e in removed,
                                  "not_removed": refused.get(e.key)} for e in found],
                     "nodes": [{"node_ip": n.address, "freed_bytes": n.value, "not_cleared": n.failure}
                               for n in nodes]})
    else:
        _table(f"packed data in {storage.location_of(cache_dir)}",
               ["entry", "examples", "tokens", "size", "last used", "read by"],
               [[e.key, f"{e.examples:,}" if e.complete else "-", f"{e.tokens:,}" if e.complete else "-",
                 _size(e.bytes), e.last_used.astimezone(), _cache_entry_state(e, removed, refused, users)]
                for e in found])
        total = sum(e.bytes for e in found)
        freed = sum(e.bytes for e in removed)
        incomplete = sum(not e.complete for e in found)
        console.print(f"{len(found)} entries" + (f" ({incomplete} incomplete)" if incomplete else "") +
                      f", {_size(total)}" + (f"; removed {len(removed)}, {_size(freed)} freed" if clear else ""))
        if nodes:
            console.print(f"copies trainers had pulled to their nodes: {_size(sum(n.value or 0 for n in nodes))} "
                          f"freed on {len(nodes)} node(s)")
    problems = [f"could not remove {storage.location_of(cache_dir / key)}: {why}" for key, why in refused.items()]
    problems += [f"could not clear the copies on node {n.address}: {n.failure}" for n in nodes if n.failure]
    for problem in problems:
        errors.print(f"[red]error:[/red] {problem}", soft_wrap=True)
    if problems:
        raise typer.Exit(1)


def _cache_entry_state(entry: CacheEntry, removed: list[CacheEntry], refused: dict[str, str], users: dict[str, list[str]]) -> str:
    """The `data cache` table's last column: what --clear did to the entry, else who reads it, or why none can."""
    if entry in removed:
        return "removed"
    if entry.key in refused:
        return "not removed"
    if not entry.complete:
        return "being packed" if entry.being_prepared else "incomplete (cut short)"
    return ", ".join(users.get(entry.key, []))


def _drop_node_copies(cache_dir: Path, keep: frozenset[str]) -> list[NodeAnswer]:
    """On object storage, each node of the cluster removes its mirror's copies of the entries the object store no
    longer holds (cache.drop_node_copies); nothing to do on a shared folder, or with no cluster running."""
    from ray_finetune import cluster, storage
    from ray_finetune.data import cache

    if not storage.is_mirrored(cache_dir) or not cluster.join_if_running():
        return []
    return cluster.on_every_node(cache.drop_node_copies, storage.location_of(cache_dir), keep,
                                 within_s=CLEAR_NODE_WITHIN_S)


def _size(count: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            break
        count /= 1000
    return f"{count:,.0f} B" if unit == "B" else f"{count:,.1f} {unit}"


def _step_status(update: dict) -> str:
    """A TRAIN_UPDATED payload in a line (steps logged before grad_norm was recorded have none)."""
    grad_norm = f"grad norm {update['grad_norm']:.3g}  " if "grad_norm" in update else ""
    return f"loss {update['loss']:.4f}  {grad_norm}{update['tokens_per_second']:,.0f} tok/s"


def _follow_with_progress(name: str, since_resumed: bool = False):
    fm = _fm()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=errors) as progress:
        task = progress.add_task(name, total=None, status="queued")
        for event in fm.follow_events(name, since_resumed=since_resumed):
            if event.type == "TRAIN_UPDATED":
                p = event.payload
                progress.update(task, total=p["total_steps"], completed=p["step"],
                                status=_step_status(p))
            elif event.type == "DATA_PROGRESS":   # the same bar counts shards while the data is tokenized
                p = event.payload
                progress.update(task, total=p["shards"], completed=p["shards_done"],
                                status=f"tokenizing {p['parameter']}")
            else:
                progress.console.print(f"[dim]{event.time:%H:%M:%S}[/dim] {event.type}: {event.message}")
                # the bar's last word is where the run is, not "queued" after it started (or failed)
                progress.update(task, status=event.type.lower().replace("_", " "))
    return fm.get(name)


def _run_dict(run) -> dict[str, Any]:
    data = asdict(run)
    data.pop("events", None)
    return data


@runs_app.command("list")
def runs_list(
    status: list[str] = typer.Option([], help="filter by status (repeatable)"),
    user: list[str] = typer.Option([], help="filter by creator (repeatable)"),
    limit: int = typer.Option(100),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Runs, newest first."""
    runs = _guarded(lambda: _fm().list(statuses=status or None, user_emails=user or None, limit=limit))
    if as_json:
        _print_json([_run_dict(r) for r in runs])
        return
    _table(None, ["name", "status", "model", "created_by", "created_at", "details"],
           [[r.name, r.status, r.model, r.created_by, r.created_at, r.details] for r in runs],
           droppable=("created_by", "model", "created_at"))


@runs_app.command("get")
def runs_get(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """One run, with its status and details."""
    run = _guarded(lambda: _fm().get(name))
    if as_json:
        _print_json(_run_dict(run))
        return
    fields = _run_dict(run)
    fields.pop("submitted_config", None)
    _table(run.name, ["field", "value"], [[k, v] for k, v in fields.items()])


@runs_app.command("cancel")
def runs_cancel(names: list[str], checkpoint: bool = typer.Option(False, "--checkpoint",
                                                                   help="write a final checkpoint first")) -> None:
    """Stop runs at the next step boundary; prints how many were stopped."""
    count = _guarded(lambda: _fm().cancel(names, save_checkpoint=checkpoint))
    console.print(f"stopped {count} run(s)")


@runs_app.command("resume")
def runs_resume(name: str, wait: bool = typer.Option(False, "--wait", help="follow the run until it ends"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Continue a STOPPED or FAILED run from its newest checkpoint, exactly where it left off."""
    run = _guarded(lambda: _fm().resume(name))
    if wait:
        _follow_to_the_end(run.name, as_json, since_resumed=True)
    elif as_json:
        _print_json(_run_dict(run))
    else:
        console.print(f"resumed [bold]{run.name}[/bold] ({run.status.value}); follow it with "
                      f"`ray-finetune events {run.name} --follow`")


@runs_app.command("delete")
def runs_delete(names: list[str]) -> None:
    """Forget runs (canceling those still going)."""
    count = _guarded(lambda: _fm().delete(names))
    console.print(f"deleted {count} run(s)")


@app.command()
def events(name: str, follow: bool = typer.Option(False, "--follow", "-f"),
           as_json: bool = typer.Option(False, "--json")) -> None:
    """A run's events, oldest first; --follow streams until the run ends."""
    fm = _fm()
    stream = _guarded(lambda: fm.follow_events(name) if follow else fm.get_events(name))
    rows = []
    for event in stream:
        if as_json:
            rows.append({"type": event.type, "time": event.time, "message": event.message, "payload": event.payload})
        elif follow:
            console.print(f"{event.time:%Y-%m-%d %H:%M:%S}  {event.type:<18} {event.message}")
        else:
            rows.append([event.type, event.time, event.message])
    if as_json:
        _print_json(rows)
    elif not follow:
        _table(name, ["type", "time", "message"], rows)


@app.command()
def checkpoints(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """A run's checkpoint folders, oldest first."""
    paths = _guarded(lambda: _fm().get_checkpoints(name))
    if as_json:
        _print_json(paths)
    else:
        for path in paths:
            console.print(path, soft_wrap=True)


@app.command()
def models(as_json: bool = typer.Option(False, "--json")) -> None:
    """Models available on this machine without a network."""
    found = _guarded(lambda: _fm().get_models())
    if as_json:
        _print_json([asdict(m) for m in found])
        return
    _table(None, ["name", "display_name", "max_context_length"],
           [[m.name, m.display_name, m.max_context_length] for m in found])


@app.command()
def sql(query: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Read-only SQL over the event log (tables: events, run_events, runs)."""
    from ray_finetune import events as event_log

    frame = _guarded(lambda: event_log.sql(query))
    # SQL NULL prints as an empty cell and JSON null; pandas holds it as NaN, which is not JSON.
    rows = frame.astype(object).where(frame.notna(), None)
    if as_json:
        _print_json(rows.to_dict(orient="records"))
        return
    _table(None, [str(c) for c in frame.columns], rows.values.tolist())


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Is the cluster up, does each of its service actors answer, does every node reach the storage and the head the
    MLflow tracking store, what runs and what waits. Starts nothing; exit code 1 when no cluster is running, an
    actor does not answer, or a node does not reach the storage or the head the tracking store."""
    from ray_finetune import cluster, health

    if not cluster.join_if_running():
        address = os.environ.get("RAY_ADDRESS")
        errors.print(f"no cluster answers at RAY_ADDRESS={address}: is its head up, and the address right?"
                     if address else "no cluster is running: RAY_ADDRESS is not set and this home's local head is "
                     "not up (the first create() starts one)", soft_wrap=True)
        raise typer.Exit(1)
    found = health.cluster_status()
    if as_json:
        _print_json({**asdict(found), "healthy": found.healthy})
    else:
        console.print(f"cluster {found.address}: {found.nodes_alive} node(s); CPU {found.available['CPU']:g} of "
                      f"{found.total['CPU']:g} free, GPU {found.available['GPU']:g} of {found.total['GPU']:g} free")
        _table(None, ["actor", "state", "pid", "node"],
               [[a.role, a.state, a.pid, a.node_ip] for a in found.actors])
        if found.nodes:
            _table(f"storage {found.storage or '(not known)'}", ["node", "storage"],
                   [[n.node_ip, n.state] for n in found.nodes])
        console.print(f"MLflow tracking store {found.tracking_store or '(not known)'}: {found.tracking_state}",
                      soft_wrap=True)
        _table(f"running ({len(found.running)})", ["run", "status", "last event", "seconds ago"],
               [[r.name, r.status, r.last_event, f"{r.last_event_s_ago:g}"] for r in found.running])
        console.print(f"queued ({len(found.queued)}), next first: {', '.join(found.queued) or '-'}", soft_wrap=True)
    if not found.healthy:
        raise typer.Exit(1)


@app.command()
def down() -> None:
    """Stop the local Ray head that ray_finetune started (runs in progress stop with it)."""
    from ray_finetune import cluster

    stopped = cluster.down()
    console.print("stopped the local Ray head" if stopped else "no local Ray head was running")


if __name__ == "__main__":
    app()
