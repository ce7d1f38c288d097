"""Reading user data: JSONL records and folders of .txt documents, streamed (never a whole file in memory)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from ray_finetune.errors import ValidationError


def local_path(parameter: str, path: str) -> Path:
    """A user's path as a local Path (file:// accepted); errors name the parameter."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ValidationError(parameter, f"{path!r} uses a storage protocol this version cannot read",
                              expected="a local path or a file:// URL")
    resolved = Path(text).expanduser()
    if not resolved.exists():
        raise ValidationError(parameter, f"{path!r} does not exist", expected="a path to an existing file or folder")
    return resolved.resolve()


def read_jsonl(parameter: str, path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line; a line that is not JSON is a ValidationError."""
    file = local_path(parameter, path)
    if file.is_dir():
        raise ValidationError(parameter, f"{path!r} is a folder", file=str(file), expected="a .jsonl file")
    with file.open("r", encoding="utf-8") as handle:
        line_no = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as error:
                raise ValidationError(parameter, f"is not UTF-8 ({error.reason})", file=str(file),
                                      line=line_no + 1, expected="UTF-8 text") from None
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValidationError(parameter, f"is not valid JSON ({error.msg} at column {error.colno})",
                                      file=str(file), line=line_no, expected="one JSON object per line") from None


def text_files(parameter: str, path: str) -> list[Path]:
    """Every .txt file under a folder, recursively, in a stable order."""
    folder = local_path(parameter, path)
    if not folder.is_dir():
        raise ValidationError(parameter, f"{path!r} is not a folder", file=str(folder),
                              expected="a folder of .txt files for CONTINUED_PRETRAIN")
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise ValidationError(parameter, f"no .txt files under {path!r}", file=str(folder),
                              expected="at least one .txt file (searched recursively)")
    return files


def read_text(parameter: str, file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValidationError(parameter, f"is not UTF-8 (byte {error.start})", file=str(file),
                              expected="UTF-8 text") from None
