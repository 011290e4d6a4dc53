"""A real one-node SLURM cluster with accounting (cluster/local-slurm) as a pytest fixture.

tests/conftest.py imports it, so every test module can use it by name; tests that use it go
in tests/test_end_to_end.py (conftest refuses them elsewhere, so that one pytest-xdist worker
owns the cluster):

    @pytest.mark.slow
    def test_something(local_slurm):
        local_slurm.run(["sbatch", "--wait", "-p", local_slurm.partition, "--wrap", "true"])

The fixture is session-scoped: one cluster for the session (`up` restarts it cleanly).

It needs root (apt-get, /etc/slurm, daemons) and fails with a clear message otherwise;
deselect these tests with `-m 'not slow'`.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local-slurm"
# A folder of its own (not the developer's default /tmp/rmt-slurm), readable by the mysql
# user: pytest's tmp_path (/tmp/pytest-of-root, mode 700) is not.
STATE_DIR = Path(os.environ.get("RMT_TEST_SLURM_STATE", "/tmp/rmt-slurm-test"))
UP_TIMEOUT = 600  # apt-get may install the packages first
DOWN_TIMEOUT = 180
# SLURM job states after which a job no longer changes.
FINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
}


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class LocalSlurm:
    """What a test needs to know about the running cluster."""

    state_dir: Path
    partition: str = "cpu"
    cluster: str = "local"
    script: Path = SCRIPT

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def run(self, args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        """Run a command (e.g. sbatch) with a time limit, capturing text output."""
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)

    def sacct(self, job_id: str) -> dict[str, str]:
        """The accounting record of a job (allocation only): State, ExitCode, JobName.

        A job that ends within a second may first be recorded under the JobName
        "allocation"; slurmdbd corrects the name a few seconds later.
        """
        out = self.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobIDRaw,State,ExitCode,JobName"],
            timeout=30,
        )
        for line in out.stdout.splitlines():
            fields = line.split("|")
            if fields[0] == job_id:
                state = fields[1].split()[0] if fields[1] else ""  # "CANCELLED by 0"
                return {
                    "JobID": fields[0], "State": state, "ExitCode": fields[2], "JobName": fields[3],
                }
        return {}

    def wait_final(self, job_id: str, timeout: float = 60) -> dict[str, str]:
        """Poll sacct until the job's record has a final state; fail after `timeout` s."""
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            record = self.sacct(job_id)
            if record.get("State") in FINAL_STATES:
                return record
            time.sleep(1)
        pytest.fail(f"job {job_id} has no final state in sacct after {timeout} s: {record}")


def _down() -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            [str(SCRIPT), "down", "--state", str(STATE_DIR)],
            capture_output=True, text=True, timeout=DOWN_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture(scope="session")
def local_slurm():
    """Start the cluster (`cluster/local-slurm up`), yield a LocalSlurm, stop it after."""
    if os.geteuid() != 0:
        pytest.fail(
            "the local SLURM cluster tests need root (cluster/local-slurm installs packages, "
            "writes /etc/slurm and starts daemons); run them as root, or deselect them with "
            "-m 'not slow'",
            pytrace=False,
        )
    try:
        up = subprocess.run(
            [str(SCRIPT), "up", "--state", str(STATE_DIR)],
            capture_output=True, text=True, timeout=UP_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        _down()
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(
            f"cluster/local-slurm up took more than {UP_TIMEOUT} s:\n{_tail(out)}", pytrace=False
        )
    if up.returncode != 0:
        _down()
        pytest.fail(
            f"cluster/local-slurm up failed (exit {up.returncode}):\n"
            f"{_tail(up.stdout, 15)}\n{_tail(up.stderr)}",
            pytrace=False,
        )
    try:
        yield LocalSlurm(state_dir=STATE_DIR)
    finally:
        down = _down()
        if down is None or down.returncode != 0:
            detail = "timed out" if down is None else _tail(down.stdout + down.stderr)
            pytest.fail(f"cluster/local-slurm down failed: {detail}", pytrace=False)
