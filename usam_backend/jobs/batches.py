"""Running a list of task jobs for a command (``usam preannotate``, ``usam refine --project``): on RQ
workers when ``REDIS_URL`` is set (queued, then one progress bar over all their tasks), else one
after another in the command's own process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from usam_backend.core.errors import UsamError
from usam_backend.core.settings import Settings
from usam_backend.jobs.runners import JobSpec, Runner, make_runner, run_function

COUNTS = ("predicted", "refined", "skipped", "failed")
"""What task jobs count in their results; totals are summed over the jobs."""


@dataclass
class Outcome:
    totals: dict[str, int]
    failed_jobs: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)  # each finished job's result


def run_task_jobs(
    settings: Settings, specs: list[JobSpec], *, total: int, desc: str, wait: bool = True,
    timeout: float | None = None,
) -> Outcome | None:  # fmt: skip
    """Run the jobs (each ``request["tasks"]`` a chunk of ``total`` tasks); None when they were only
    queued (``wait=False``)."""
    runner = make_runner(settings)
    totals = dict.fromkeys(COUNTS, 0)
    if runner.kind == "embedded":  # no Redis: this process does the work
        results = []
        failed = []
        with tqdm(total=total, desc=desc, unit="task") as bar:
            for spec in specs:
                try:
                    counts = run_function(spec.function, settings, spec.request, None)
                except UsamError as exc:  # as a worker would: the job failed, the others still run
                    failed.append({"id": spec.id, "status": "failed", "error": str(exc)})
                    continue
                finally:
                    bar.update(len(spec.request["tasks"]))
                results.append(counts)
                for key in totals:
                    totals[key] += int(counts.get(key, 0))
        return Outcome(totals, failed, results=results)
    for spec in specs:
        runner.submit(spec, force=True)  # a finished chunk re-run skips what it did
    print(f"queued {len(specs)} job(s) of up to {settings.preannotate_chunk} tasks on {settings.queue}")
    if not wait:
        return None
    jobs = wait_for(runner, [spec.id for spec in specs], total, desc=desc, timeout=timeout)
    chunk_jobs = [i for job in jobs for i in (job.get("result") or {}).get("chunk_jobs") or []]
    if chunk_jobs:  # video tasks split over more jobs: wait for those too
        jobs = jobs + wait_for(runner, chunk_jobs, len(chunk_jobs), desc="video chunks", timeout=timeout, unit="job")
    for job in jobs:
        for key in totals:
            totals[key] += int((job.get("result") or {}).get(key, 0))
    failed = [j for j in jobs if j["status"] != "finished"]
    return Outcome(totals, failed, [j.get("result") or {} for j in jobs if j["status"] == "finished"])


def wait_for(runner: Runner, job_ids: list[str], total: int, *, desc: str = "tasks", poll: float = 1.0,
             timeout: float | None = None, unit: str = "task") -> list[dict[str, Any]]:  # fmt: skip
    """Show one progress bar over the tasks of these jobs (``unit="job"``: over the jobs) until they
    all end; returns the jobs."""
    wanted = set(job_ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=total, desc=desc, unit=unit)
    ended = ("finished", "failed", "stale")
    try:
        while True:
            jobs = runner.get(job_ids)
            if unit == "job":
                done = sum(j["status"] in ended for j in jobs)
            else:
                done = sum(int((j.get("progress") or {}).get("done") or 0) for j in jobs)
            bar.update(max(0, done - bar.n))
            if len(jobs) == len(wanted) and all(j["status"] in ended for j in jobs):
                bar.update(total - bar.n if all(j["status"] == "finished" for j in jobs) else 0)
                return jobs
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("pre-annotation jobs still running")
            time.sleep(poll)
    finally:
        bar.close()
