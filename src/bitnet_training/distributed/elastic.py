"""Surviving a crashed worker: `torchrun --max-restarts=N` restarts the whole group when a
worker dies, with the same command line, and says so (TORCHELASTIC_RESTART_COUNT > 0). The
restarted run then resumes from the output directory's latest checkpoint by itself, without
`--resume`, and equals an uninterrupted run (resume is exact).

Only a directory this torchrun job trained in is taken over: rank 0 writes the job's id
(TORCHELASTIC_RUN_ID, the same on every restart) to `<output_dir>/.torchrun-job` once a run
has passed its checks. A restart in a directory another job left is treated as a fresh
launch (so a first attempt refused for an occupied directory stays refused, and nothing
is cleared). A restart before the first checkpoint starts again from step 0, dropping the
failed attempt's logs.
"""

from __future__ import annotations

import os

from ..atomic import atomic_file

JOB_FILE = ".torchrun-job"


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0: the first attempt, or not
    under torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def job_id() -> str | None:
    """torchrun's run id (`--rdzv-id`, or the one `--standalone` makes up); None outside it."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or None


def mark_job(output_dir: str) -> None:
    """Record that this torchrun job trains in `output_dir` (rank 0, once the run starts)."""
    if job_id() is not None:
        with atomic_file(os.path.join(output_dir, JOB_FILE)) as tmp, open(tmp, "w") as f:
            f.write(job_id() + "\n")


def _owned(output_dir: str) -> bool:
    try:
        with open(os.path.join(output_dir, JOB_FILE)) as f:
            return f.read().strip() == job_id()
    except OSError:
        return False


def _latest(output_dir: str) -> str | None:
    """The checkpoint the `latest` pointer names, if it exists (read here: this layer sits
    below the checkpoint module)."""
    try:
        with open(os.path.join(output_dir, "latest")) as f:
            name = f.read().strip()
    except OSError:
        return None
    path = os.path.join(output_dir, name)
    return path if name and os.path.isdir(path) else None


def restart_plan(
    output_dir: str, resume: str | None, overwrite: bool
) -> tuple[str | None, bool, str | None]:
    """(resume, overwrite, note) for this launch. A restart of the job that trains in
    `output_dir` resumes its latest checkpoint (or starts again, clearing the failed
    attempt's logs, when it had none); anything else keeps the command line's choice."""
    attempt = restart_count()
    if attempt == 0 or job_id() is None or not _owned(output_dir):
        return resume, overwrite, None
    latest = _latest(output_dir)
    if latest is not None:
        return "latest", False, f"torchrun restart {attempt}: resuming from {latest}"
    if resume is not None:
        return resume, overwrite, f"torchrun restart {attempt}: no checkpoint yet, as launched"
    return None, True, f"torchrun restart {attempt}: no checkpoint yet, starting again"
