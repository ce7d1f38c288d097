"""The log never loses an acknowledged event: a writer killed mid-append leaves a file that reopens with every
event it acknowledged, and seq stays gap-free."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from eventstore.store import EventStore

WRITER = """
import sys
from eventstore.schema import EventType, NewEvent
from eventstore.store import EventStore
store = EventStore(sys.argv[1])
i = 0
while True:
    batch = [NewEvent(run_name=f"r{i % 7}", type=EventType.TRAIN_UPDATED, actor="writer", message="x" * 200,
                      payload={"step": i, "blob": "y" * 500}, idempotency_key=f"k{i}-{j}") for j in range(5)]
    appended = store.append(batch)
    print(appended[-1].seq, flush=True)   # acknowledged
    i += 1
"""


def test_a_writer_killed_mid_append_loses_no_acknowledged_event(tmp_path):
    path = tmp_path / "events.duckdb"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acknowledged = 0
    deadline = time.monotonic() + 60
    while acknowledged < 2000 and time.monotonic() < deadline:
        line = writer.stdout.readline()
        if line:
            acknowledged = int(line)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert acknowledged >= 2000
    store = EventStore(path)
    seqs = [e.seq for e in store.events()]
    assert seqs == list(range(1, len(seqs) + 1))    # gap-free, nothing half-written
    assert len(seqs) >= acknowledged and len(seqs) % 5 == 0   # whole batches only
    store.append([])
