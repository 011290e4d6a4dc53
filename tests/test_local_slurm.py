"""cluster/local-slurm gives a real SLURM with accounting: jobs run and sacct reports them."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _submit_wait(cluster, tmp_path, name: str, command: str):
    """sbatch --wait a one-line job; return (job id, completed process)."""
    result = cluster.run(
        [
            "sbatch", "--parsable", "--wait", "-p", cluster.partition, "-t", "1",
            "-J", name, "-D", str(tmp_path), "-o", str(tmp_path / f"{name}.out"),
            "--wrap", command,
        ],
        timeout=120,
    )
    job_id = result.stdout.strip().splitlines()[0].split(";")[0] if result.stdout.strip() else ""
    assert job_id.isdigit(), f"no job id from sbatch: {result.stdout!r} {result.stderr!r}"
    return job_id, result


def test_sbatch_job_completes_and_is_in_sacct(local_slurm, tmp_path):
    job_id, result = _submit_wait(local_slurm, tmp_path, "rmt-ok", "echo hello from $SLURM_JOB_ID")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "rmt-ok.out").read_text().strip() == f"hello from {job_id}"
    record = local_slurm.wait_final(job_id)
    assert record["State"] == "COMPLETED", record
    assert record["ExitCode"] == "0:0"
    # Not JobName: for a job that ends within a second, slurmdbd may first record it under
    # the name "allocation" and correct the name a few seconds later.


def test_failing_job_is_failed_in_sacct(local_slurm, tmp_path):
    job_id, result = _submit_wait(local_slurm, tmp_path, "rmt-fail", "exit 3")
    assert result.returncode != 0  # sbatch --wait exits with the job's exit code
    record = local_slurm.wait_final(job_id)
    assert record["State"] == "FAILED", record
    assert record["ExitCode"] == "3:0"
