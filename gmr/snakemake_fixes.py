"""A guarded patch for a Snakemake scheduler bug that oversubscribes local cores and GPUs.

snakemake/snakemake#3913 (9.10 to at least 9.15, open): when exactly one job is ready, the job
scheduler starts it without taking its threads and resources from the pool, but gives them back when
it ends, so the pool grows. In this workflow `prepare_data` runs alone first; afterwards `--cores 2`
ran three one-thread training jobs at once, and a `gpu=1` limit would let two GPU jobs share one GPU.
No Snakemake option avoids that path (the ILP scheduler shares it), hence this patch: it takes the
selected job's resources from the pool on that path too. It applies only to the affected versions
and only where the scheduler's code still has the expected shape; otherwise it does nothing.
"""
from __future__ import annotations

import inspect

AFFECTED = ((9, 10), (9, 16))  # [first affected, first version not patched) as (major, minor)


def snakemake_version() -> tuple[int, int]:
    import snakemake

    return tuple(int(p) for p in snakemake.__version__.split("+")[0].split(".")[:2])


def fix_scheduler_accounting() -> bool:
    """Patch Snakemake's JobScheduler once; True when the patch is (now or already) in place."""
    from snakemake.scheduling.job_scheduler import JobScheduler

    if getattr(JobScheduler, "_gmr_accounting_fix", False):
        return True
    if not AFFECTED[0] <= snakemake_version() < AFFECTED[1]:
        return False
    if "if len(jobs) == 1:" not in inspect.getsource(JobScheduler.job_selector):
        return False
    init = JobScheduler.__init__

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        greedy = self.job_selector_greedy

        def select(jobs, remaining_jobs, resources, input_sizes):
            selected = greedy(jobs, remaining_jobs, resources, input_sizes)
            # job_selector calls the greedy selector directly for a single ready job and skips
            # update_available_resources; for several jobs it calls it itself after selection.
            if len(jobs) == 1 and selected:
                self.update_available_resources(selected)
            return selected

        self.job_selector_greedy = select

    JobScheduler.__init__ = patched_init
    JobScheduler._gmr_accounting_fix = True
    return True
