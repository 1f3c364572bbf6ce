"""What a job's process records: one JSON line per finished item in its own log, a progress bar,
and (the main process) the merged summary of every process's records.

Each process appends to its own ``log-process-<i>.jsonl`` (no two processes write one file), one
line per item written or failed, flushed as it is done: after a crash the log shows what was
finished. A line cut short by the crash is the only one that does not parse.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..media.files import write_file_whole
from ..tasks.shares import Share

JOB_FOLDER = ".vilau-job"  # beside the outputs (hidden: a folder's listing never walks it), unless --job-dir
SUMMARY_NAME = "summary.json"
LISTED = 50  # skipped items named in summary.json; failures are always all listed


@dataclass(frozen=True)
class ItemRecord:
    item: str  # the image path or the output name
    status: str  # "written", "skipped" or "failed"
    detail: str = ""  # why skipped, the error, or the written file
    process: int = 0


class JobLog:
    """One process's log file and progress bar (tqdm: items done, items/s, time left)."""

    def __init__(self, folder: Path, share: Share, unit: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"log-process-{share.index}.jsonl"
        self.share = share
        self.unit = unit
        self.records: list[ItemRecord] = []
        self.bar = None

    def start(self, total: int) -> None:
        """The bar for this process's `total` items to do (skipped ones are not counted)."""
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"process {self.share.index + 1}/{self.share.count}", unit=self.unit,
                            position=self.share.index, dynamic_ncols=True)

    def finished(self, item: str, status: str, detail: str = "") -> None:
        record = ItemRecord(item, status, detail, self.share.index)
        self.records.append(record)
        if status == "skipped":  # listed in the summary only: a rerun does not repeat the whole log
            return
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(json.dumps({**asdict(record), "time": round(time.time(), 3)}, ensure_ascii=False) + "\n")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_record(kind: str, processes: int, records: list[ItemRecord], seconds: float) -> dict:
    """The merged summary of a run: counts, every failure, the first skipped items (all sorted by item)."""
    records = sorted(records, key=lambda r: r.item)
    by_status = {status: [r for r in records if r.status == status] for status in ("written", "skipped", "failed")}
    return {
        "job": kind,
        "processes": processes,
        "seconds": round(seconds, 2),
        **{status: len(entries) for status, entries in by_status.items()},
        "failures": [{"item": r.item, "error": r.detail} for r in by_status["failed"]],
        "skipped_items": [{"item": r.item, "why": r.detail} for r in by_status["skipped"][:LISTED]],
    }


def write_summary(folder: Path, summary: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_file_whole(folder / SUMMARY_NAME, (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())


def finish_job(processes, log: JobLog, kind: str, started: float) -> dict | None:
    """Close this process's bar, wait for every process, and (main process) write the merged summary
    beside the logs. Returns the summary on the main process, None on the others."""
    log.close()
    records = processes.gather(log.records)
    if not processes.is_main:
        return None
    summary = summary_record(kind, processes.share.count, records, time.monotonic() - started)
    write_summary(log.path.parent, summary)
    return summary
