"""Checkpoint layout (SPEC §5) and the atomic steps that make a torn checkpoint impossible to load.

    <save_folder>/<run_name>/checkpoints/ep{E}-ba{B}/       DeepSpeed state + model/ (HF safetensors) + trainer_state.json
    <save_folder>/<run_name>/checkpoints/latest-sharded-rank0.symlink   names the newest complete checkpoint

A checkpoint is written under a temporary name and renamed into place when complete; the pointer file is
replaced atomically only afterwards. On object storage (storage.py) the checkpoint is written in the node's mirror
and pushed with its trainer state last, then the pointer (in the background: publishing.py); whether a checkpoint
is complete, and which is the newest, is asked of the object store.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ray_finetune import storage
from ray_finetune.access import check_allowed
from ray_finetune.errors import CheckpointError, ValidationError, one_line

POINTER_NAME = "latest-sharded-rank0.symlink"
WEIGHTS_DIR = "model"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^ep(\d+)-ba(\d+)$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ep{epoch}-ba{step}"


def checkpoints_dir(save_folder: str | Path, run_name: str) -> Path:
    """The run's checkpoints folder on this node (a mirror path when save_folder is an object-store URL)."""
    return storage.local(save_folder) / run_name / "checkpoints"


def staging_name(name: str) -> str:
    return f".tmp-{name}"


def place(directory: Path, name: str) -> Path:
    """Rename a finished staging folder into place (on object storage: in this node's mirror, to be pushed)."""
    final = directory / name
    if storage.is_mirrored(final) and final.is_dir():
        # a mirror copy the object store never completed (the run resumed from an earlier checkpoint)
        shutil.rmtree(final)
    (directory / staging_name(name)).rename(final)
    return final


def point(directory: Path, name: str) -> None:
    """Point the pointer file at checkpoint `name`, atomically (and push it, on object storage): only once the
    checkpoint is complete."""
    pointer = directory / POINTER_NAME
    temporary = directory / f".{POINTER_NAME}.tmp"
    temporary.write_text(name + "\n")
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, pointer)
    storage.push(pointer)


@dataclass(frozen=True)
class EngineLayout:
    """How DeepSpeed lays out a checkpoint's engine state: its optimizer, and so the files and what they hold,
    differ by ZeRO stage and precision. An engine loads its own layout as it is; every ZeRO stage >= 1 loads the
    universal conversion (below) of any layout but ZeRO-0's."""
    zero_stage: int
    bf16: bool

    def __str__(self) -> str:
        return f"ZeRO-{self.zero_stage} {'bf16' if self.bf16 else 'fp32'}"

    @staticmethod
    def saved(state: dict) -> "EngineLayout | None":
        """The layout a checkpoint's trainer `state` records (None: written before checkpoints recorded it)."""
        return EngineLayout(**state["deepspeed"]) if "deepspeed" in state else None


UNIVERSAL_DIR = "universal"
CONVERTED_FILE = "converted"   # written last into universal/: its presence makes the conversion complete


def universal(folder: Path) -> Path:
    """The checkpoint's DeepSpeed state in DeepSpeed's universal layout (optimizer state by parameter instead of by
    rank), which loads on any number of ranks: what a ZeRO-1/2/3 run resumed on another number of workers needs.
    Converted once, into `folder/universal` (which holds all DeepSpeed then reads), under a temporary name renamed
    into place when complete; on object storage the converter pulls every rank's partition first, and pushes the
    conversion with CONVERTED_FILE last, so that a push cut short (the run interrupted) is converted again by the
    next attempt instead of taken as done. The other nodes pull the conversion only."""
    target = folder / UNIVERSAL_DIR
    if storage.exists(target / CONVERTED_FILE):
        return storage.pull_some(target, lambda _: True)   # what this node lacks of it
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    pull_to_resume(folder, None)   # on object storage: every rank's partition, which only the converter reads
    staging = folder / f".tmp-{UNIVERSAL_DIR}"   # one converter per run (rank 0); a failed attempt's is replaced
    source = folder / f".tmp-{UNIVERSAL_DIR}-input"
    for stale in (staging, source, target):      # target: this node's copy of a conversion whose push was cut short
        shutil.rmtree(stale, ignore_errors=True)
    try:
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(_without_module_weights(folder, source)), output_folder=str(staging),
            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
            inject_missing_state=True))
    finally:
        shutil.rmtree(source, ignore_errors=True)
    _loadable_by_every_stage(staging)
    (staging / CONVERTED_FILE).write_text("")
    staging.rename(target)
    storage.push(target, last=(CONVERTED_FILE,))   # on object storage: for the ranks of other nodes
    return target


def _loadable_by_every_stage(converted: Path) -> None:
    """Make DeepSpeed's conversion load under every ZeRO stage >= 1, not only the one that wrote it: a run requeued
    onto fewer or more GPUs may get another stage (memory.gpu_zero_stage), or an operator may set another. The
    per-parameter files are the same for every stage; what each stage's loader reads besides differs:
    - the engine state, from `mp_rank_00_model_states.pt` under ZeRO-1/2 and `zero_pp_rank_0_mp_rank_00_...`
      under ZeRO-3 (the module's weights in neither: universal loading takes them from the parameters' files);
    - in `zero/optimizer_state.pt`, the ZeRO-1/2 loaders need `ds_version` and `param_groups`, ZeRO-3's the
      optimizer's step under `optimizer_state_dict`; ZeRO-1/2 take the step from each parameter's `step.pt`;
    - a parameter's weights and moments: ZeRO-1/2 read `{"param": <in the parameter's shape>, ...}`, ZeRO-3 that
      or the flat tensor its converter writes.
    And for ZeRO-3 the converter copies rank 0's whole optimizer file into `zero/optimizer_state.pt` (its fp32
    weights and moments: 1/N of the run's optimizer state, 807 MB for SmolLM2-135M on 2 ranks), which every
    resuming rank would load into memory for those few scalars: it is written again without them."""
    import torch
    from deepspeed.checkpoint.constants import (CAT_DIM, DS_VERSION, FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM,
                                                PARAM_GROUPS, PARAM_SHAPES)
    from deepspeed.git_version_info import version as deepspeed_version

    engine_state = sorted(converted.glob("*model_states.pt"))[0]   # mp_rank_00_..., or ZeRO-3 rank 0's
    state = torch.load(engine_state, map_location="cpu", weights_only=False)
    state["module"] = None
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        torch.save(state, converted / name)
    zero = converted / "zero"
    parameters = [entry for entry in zero.iterdir() if entry.is_dir()]
    common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    from_zero_3 = OPTIMIZER_STATE_DICT in common
    step = (next(iter(common[OPTIMIZER_STATE_DICT]["state"].values()))["step"] if from_zero_3 else
            torch.load(parameters[0] / "step.pt", weights_only=False))
    common.pop(FP32_FLAT_GROUPS, None)
    common[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, PARAM_GROUPS: common[PARAM_GROUPS]}
    common.setdefault(DS_VERSION, deepspeed_version)
    torch.save(common, zero / "optimizer_state.pt")
    if from_zero_3:
        shapes = {name: shape for group in state[PARAM_SHAPES] for name, shape in group.items()}
        for parameter in parameters:
            for flat_file in parameter.glob("*.pt"):
                flat = torch.load(flat_file, map_location="cpu", weights_only=False)
                torch.save({PARAM: flat.view(shapes[parameter.name]), CAT_DIM: 0}, flat_file)
            torch.save(step, parameter / "step.pt")


# DeepSpeed's engine state of a ZeRO-0/1/2 checkpoint, with the module's weights (ZeRO-3's are per rank, weightless)
_MODEL_STATES = re.compile(r"^mp_rank_\d+_model_states\.pt$")


def _without_module_weights(folder: Path, view: Path) -> Path:
    """Checkpoint `folder` as the universal converter is to read it, in `view`: its DeepSpeed files linked, but its
    model-states files written again without the module's weights. Why: the converter saves every module weight it
    finds no optimizer fragment for, each with its whole storage -- under ZeRO-1/2 the flat buffer all the weights
    share -- and CausalLMLoss gives its module's weights the HF model's names (`model.norm.weight`, so that the file
    loads into the bare model) while the fragments carry the engine's (`lm.model.norm.weight`): every weight would
    be saved as a copy of the whole model (273 x 538 MB for SmolLM2-135M; the disk fills and the resume fails).
    Loading the universal layout takes the weights from the fragments, never from the module."""
    import torch

    view.mkdir()
    for entry in folder.iterdir():
        if entry.name in (WEIGHTS_DIR, UNIVERSAL_DIR) or entry.name.startswith("."):
            continue
        if _MODEL_STATES.match(entry.name):
            state = torch.load(entry, map_location="cpu", weights_only=False, mmap=True)
            state["module"] = None
            torch.save(state, view / entry.name)
        else:
            (view / entry.name).symlink_to(entry.resolve())
    return view


# DeepSpeed's files of one rank's partition (ZeRO-1/2: its optimizer state; ZeRO-3: its weights too).
_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_")


def pull_to_resume(folder: Path, ranks: Collection[int] | None) -> Path:
    """This node's copy of what DeepSpeed reads to resume from checkpoint `folder` on object storage (a shared folder
    is read where it is): not the consolidated weights (model/, for serving and for runs started from them), and,
    given this node's `ranks` (loading on as many ranks as wrote it), not the other ranks' partitions: ZeRO keeps
    the optimizer state by rank, so a node of an N-node group would otherwise download N times its share (on
    another number of ranks the nodes load universal()'s conversion instead). The copy is partial: drop it
    (storage.drop_local) once loaded."""
    def wanted(relative: str) -> bool:
        top = relative.split("/", 1)[0]
        if top in (WEIGHTS_DIR, UNIVERSAL_DIR):   # a conversion is universal()'s to pull, once it is complete
            return False
        owner = _RANK_FILE.match(top)
        return ranks is None or owner is None or int(owner.group(1)) in ranks

    return storage.pull_some(folder, wanted)


def write_state(folder: Path, state: dict) -> None:
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))


def is_complete(folder: Path) -> bool:
    """Published under its final name and holding the trainer state, which is written (and pushed) last."""
    return parse_name(folder.name) is not None and storage.exists(folder / STATE_FILE)


def latest_complete(directory: Path) -> Path | None:
    """The checkpoint to resume from: the pointer's, if complete; else the newest complete one. A torn checkpoint
    (a staging folder, or one missing its trainer state) is never returned. On object storage: the object store's
    (the path returned is its mirror path, to pull before reading)."""
    try:
        named = directory / storage.read_text(directory / POINTER_NAME).strip()
        if is_complete(named):
            return named
    except OSError:   # no pointer yet, or no checkpoints folder (a file in its place, say): the listing decides
        pass
    complete = complete_checkpoints(directory)
    return complete[-1] if complete else None


def complete_checkpoints(directory: Path) -> list[Path]:
    """The complete checkpoints in a run's checkpoints `directory`, oldest first (on object storage: the store's)."""
    return _complete(directory, storage.children(directory))


def _complete(directory: Path, names: list[str]) -> list[Path]:
    """The complete checkpoints among `names` (the listing of `directory`), oldest first."""
    complete = [directory / name for name in names if parse_name(name) is not None and is_complete(directory / name)]
    return sorted(complete, key=lambda folder: _step_of(folder.name))


def read_state(folder: Path) -> dict:
    """A checkpoint's trainer state (from the object store, for a mirror path)."""
    return json.loads(storage.read_text(folder / STATE_FILE))


def ensure_same_data(folder: Path, state: dict, data_id: str) -> None:
    """A checkpoint (its trainer `state`) continues only on the packed data it was trained on (the state names it;
    checkpoints older than that record pass)."""
    saved = state.get("packed_data", data_id)
    if saved != data_id:
        raise CheckpointError(
            f"the training data changed after checkpoint {folder.name} was written (the file was edited or replaced, "
            "or the tokenizer changed): continuing the run would train on another dataset from the middle of an "
            f"epoch. Restore the data, or create a new run with custom_weights_path='{storage.location_of(folder)}' "
            "to start from these weights")


@dataclass(frozen=True)
class Retention:
    removed: tuple[Path, ...]   # what retention removed
    refused: tuple[str, ...]    # "<name>: <why>" for each folder the storage would not remove (it stays)


def retain(directory: Path, keep: int) -> Retention:
    """Remove all but the newest `keep` complete checkpoints, and what interrupted attempts left older than the
    newest complete one (torn checkpoints, staging folders). Never raises: a checkpoint complete already stays so
    whatever an older one's removal meets; what the storage refuses is named in the result, stays, and is tried again
    by the next retention. A checkpoint loses its trainer state first, so a removal cut short leaves a torn
    checkpoint, never resumed from (and removed next time)."""
    names = storage.children(directory)
    complete = _complete(directory, names)
    if not complete:
        return Retention((), ())
    newest = _step_of(complete[-1].name)
    leftovers = [directory / name for name in names
                 if directory / name not in complete and (step := _step_of(name)) is not None and step < newest]
    removed, refused = [], []
    for folder in leftovers + (complete[:-keep] if keep > 0 else []):
        try:
            storage.remove(folder, first=(STATE_FILE,))
            removed.append(folder)
        except Exception as error:  # noqa: BLE001 - any refusal of the storage (OSError, or its client's own)
            refused.append(f"{folder.name}: {one_line(error)}")
    return Retention(tuple(removed), tuple(refused))


def _step_of(name: str) -> int | None:
    """The step of a checkpoint's folder, or of its staging folder; None for any other name."""
    parsed = parse_name(name.removeprefix(staging_name("")))
    return parsed[1] if parsed else None


def initial_weights(parameter: str, path: str | Path) -> Path:
    """custom_weights_path → an HF weights folder, or a .pt file of a state dict."""
    check_allowed(parameter, path)
    candidate = storage.local(path)
    if candidate.suffix == ".pt":
        if not storage.exists(candidate):
            raise ValidationError(parameter, f"{str(path)!r} does not exist", expected="an existing .pt file")
        return candidate
    return weights_folder(parameter, path)


def weights_folder(parameter: str, path: str | Path) -> Path:
    """The HF weights folder inside a checkpoint given as a folder, a pointer file, or a folder holding them (on
    object storage: its mirror path, to pull before reading)."""
    text = str(path)
    candidate = storage.local(path)
    if candidate.name == POINTER_NAME:
        try:
            candidate = candidate.parent / storage.read_text(candidate).strip()
        except OSError:   # missing, or a folder, or under a file
            raise ValidationError(parameter, f"pointer file {text!r} does not exist",
                                  expected="the latest-sharded-rank0.symlink of a run that saved a checkpoint") from None
    inside = storage.children(candidate)
    if not inside:
        raise ValidationError(parameter, f"{text!r} is not a checkpoint folder",
                              expected=".../checkpoints/ep{E}-ba{B} or .../latest-sharded-rank0.symlink")
    for folder, names in ((candidate / WEIGHTS_DIR, storage.children(candidate / WEIGHTS_DIR)), (candidate, inside)):
        if "config.json" in names and any(name.endswith(".safetensors") for name in names):
            return folder
    raise ValidationError(parameter, f"{text!r} holds no consolidated weights (config.json + *.safetensors)",
                          expected="a complete checkpoint written by ray_finetune")


def parse_name(name: str) -> tuple[int, int] | None:
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None
