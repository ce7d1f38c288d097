"""Regenerates ray_finetune/demo_data/*.jsonl from the chitchat dataset (MIT licence, pip install chitchat-dataset).

Each conversation becomes a chat record: consecutive messages of one sender are joined into one turn, the first
speaker is the user, the other the assistant; conversations are cut to at most 6 turns ending on the assistant.
"""
import json
from pathlib import Path

import chitchat_dataset

MAX_TURNS = 6
OUT = Path(__file__).resolve().parents[1] / "ray_finetune" / "demo_data"


def to_record(conversation: dict) -> dict | None:
    groups = conversation["messages"]
    if len(groups) < 2:
        return None
    first = groups[0][0]["sender"]
    turns = []
    for group in groups[:MAX_TURNS]:
        role = "user" if group[0]["sender"] == first else "assistant"
        text = " ".join(m["text"].strip() for m in group if m["text"].strip())
        if not text or (turns and turns[-1]["role"] == role):
            return None
        turns.append({"role": role, "content": text})
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    return {"messages": turns} if len(turns) >= 2 else None


def main() -> None:
    records = [r for r in (to_record(c) for _, c in sorted(chitchat_dataset.Dataset().items())) if r]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("chat_train.jsonl", records[:48]), ("chat_eval.jsonl", records[48:60])):
        with (OUT / name).open("w") as handle:
            for record in chunk:
                handle.write(json.dumps(record) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
