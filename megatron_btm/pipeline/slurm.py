"""Thin wrappers over sbatch / scontrol / scancel / squeue (no sacct: it needs slurmdbd).

Job states come from `scontrol show job ID -o`, one record per array task (a still-pending
array shows as one record with ArrayTaskId=2-5%16, expanded here). A job that slurmctld has
purged (older than MinJobAge) is simply absent: callers fall back to the run's done-markers.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass

from megatron_btm.errors import JobFailedError

ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING")
FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
          "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT")


class SlurmError(JobFailedError):
    pass


@dataclass(frozen=True)
class TaskState:
    job_id: str            # "123" or, for an array task, "123_4"
    state: str             # JobState, e.g. COMPLETED, FAILED, PENDING
    exit_code: str = ""    # "1:0"
    reason: str = ""


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]}: not found on PATH (is this a SLURM login node?)")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)}: did not answer "
                         f"within {timeout:.0f} s (is slurmctld up?)") from None


def available() -> bool:
    """True when `sinfo` reaches a slurmctld."""
    try:
        return _run(["sinfo", "-h", "-o", "%P"], timeout=10).returncode == 0
    except SlurmError:   # not on PATH, or no answer in time
        return False


def sbatch(script: str, *, after: list[str] = (), array: str | None = None,
           extra: list[str] = ()) -> str:
    """Submit; return the job id. `after` ids become one afterok dependency (all must succeed).

    Every submission carries a unique `--comment` tag: when sbatch does not answer in time (a
    busy slurmctld may still have queued the job), the tag finds the job in squeue, so its id
    is not lost and a retry does not queue it twice."""
    tag = f"btm-submit:{uuid.uuid4().hex}"
    argv = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes", f"--comment={tag}"]
    if after:
        argv.append("--dependency=afterok:" + ":".join(after))
    if array:
        argv.append(f"--array={array}")
    argv += [*extra, script]
    try:
        p = _run(argv)
    except SlurmError as e:
        jid = _job_with_comment(tag)
        if jid is None:
            raise SlurmError(f"{e}; squeue shows no job from this submission, so nothing was "
                             "queued: submit again") from None
        return jid
    if p.returncode != 0:
        raise SlurmError(f"sbatch {script} failed (exit {p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]


def _job_with_comment(tag: str) -> str | None:
    """The (array) job id whose comment is `tag`, or None when squeue lists none."""
    p = _run(["squeue", "-h", "-o", "%F|%k"], timeout=60)
    if p.returncode != 0:
        return None
    for line in p.stdout.splitlines():
        jid, _, comment = line.strip().partition("|")
        if comment == tag:
            return jid
    return None


def scancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids])


def _expand(spec: str) -> list[int]:
    spec = spec.split("%")[0]
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        if a.isdigit():
            out += list(range(int(a), int(b) + 1)) if b.isdigit() else [int(a)]
    return out


def _fields(record: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S*)", record))


def job_states(job_id: str) -> dict[str, TaskState]:
    """{"123" or "123_4": TaskState} for a job or every task of an array; {} once purged."""
    p = _run(["scontrol", "show", "job", str(job_id), "-o"])
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:
            return {}
        raise SlurmError(f"scontrol show job {job_id} failed: {p.stderr.strip()}")
    out: dict[str, TaskState] = {}
    for line in p.stdout.splitlines():
        f = _fields(line)
        if "JobId" not in f:
            continue
        state, code, reason = f.get("JobState", "UNKNOWN"), f.get("ExitCode", ""), f.get("Reason", "")
        task = f.get("ArrayTaskId")
        if task is None:
            out[f["JobId"]] = TaskState(job_id=f["JobId"], state=state, exit_code=code, reason=reason)
            continue
        for i in _expand(task):
            jid = f"{f.get('ArrayJobId', job_id)}_{i}"
            out[jid] = TaskState(job_id=jid, state=state, exit_code=code, reason=reason)
    return out
