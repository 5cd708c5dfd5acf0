"""What every Snakemake script does first: log to the job's log file, size the thread pool."""

from __future__ import annotations

import logging
import sys
from typing import Any


def start_job(smk: Any) -> logging.Logger:
    """Send logging and stderr to `log[0]` (one human-readable log per job); set torch threads."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if smk.log:
        log_file = open(smk.log[0], "a", encoding="utf-8", buffering=1)
        sys.stderr = log_file  # tracebacks and library warnings land in the job's log
        handlers = [logging.StreamHandler(log_file)]
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logger = logging.getLogger(f"labelflow.rule.{smk.rule}")
    threads = getattr(smk, "threads", None)
    # Only jobs that already imported torch (model jobs) size its pool: importing it costs
    # seconds that light jobs (tables, plots) should not pay.
    if threads and "torch" in sys.modules:
        from labelflow.device import set_job_threads

        set_job_threads(int(threads))
    logger.info("rule %s, wildcards %s, threads %s", smk.rule, dict(smk.wildcards), threads)
    return logger


def wants_gpu(smk: Any) -> bool:
    """The job asked for a GPU through `resources: gpu=N`."""
    return int(getattr(smk.resources, "gpu", 0) or 0) > 0
