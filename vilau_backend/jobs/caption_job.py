"""`caption DIR`: a folder captioned by one or several processes, through the Caption Folder's
own code (tasks/captioning.py), each process taking its share of the sorted listing.

A rerun captions only the images that have no caption yet (captions are written whole, so one
that exists is finished); with `overwrite` every image of the share is captioned again.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..decoding.compiled_steps import CompileCallback
from ..tasks.captioning import CaptionEvent, CaptionReport, CaptionSettings, caption_folder
from .processes import JobProcesses
from .records import JOB_FOLDER, JobLog, finish_job


def caption_job(
    model, folder: str | Path, settings: CaptionSettings, processes: JobProcesses,
    job_dir: Path | None = None, on_compile: CompileCallback | None = None,
) -> dict | None:
    """Caption this process's share of `folder`; the summary (main process) or None."""
    started = time.monotonic()
    root = Path(folder).expanduser().absolute()
    log = JobLog(job_dir or root / JOB_FOLDER, processes.share, unit="img")
    report = CaptionReport(root)
    logged = {"written": 0, "failed": 0}

    def on_progress(event: CaptionEvent) -> None:
        log.start(event.total)
        if not event.images:  # a batch is finished: log its captions and failures
            _log_new(log, report, logged)

    try:
        caption_folder(model, folder, settings, on_progress=on_progress, on_compile=on_compile,
                       share=processes.share, report=report)
        _log_new(log, report, logged)  # failures of a last batch that had no readable image
        for image, why in report.skipped:
            log.finished(_relative(image, root), "skipped", why)
    finally:
        log.close()
    return finish_job(processes, log, "caption", started)


def _log_new(log: JobLog, report: CaptionReport, logged: dict[str, int]) -> None:
    root = report.folder
    for caption in report.written[logged["written"]:]:
        log.finished(_relative(caption, root), "written")
    for image, error in report.failed[logged["failed"]:]:
        log.finished(_relative(image, root), "failed", error)
    logged["written"], logged["failed"] = len(report.written), len(report.failed)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
