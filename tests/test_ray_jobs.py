"""Ray Jobs end to end: a local head from `ray start`, a tiny fine-tune submitted with the job
SDK as `python jobs/finetune.py ...`, its actors on that cluster, its run in the test's MLflow
store."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from conftest import tiny_finetune_overrides
from ray.job_submission import JobStatus, JobSubmissionClient

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # holds `ray`, and the `python` Ray Jobs will run
# Kept out of the uploaded working_dir (anchored so that ctrl_ray/data/ stays in).
EXCLUDES = ["/.venv", "/outputs", "/data", "/runs", "/mlruns", "/mlartifacts", "*.db", "/.git",
            "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "/build"]
JOB_TIMEOUT_S = 300


@dataclass
class RayHead:
    temp_dir: Path
    dashboard_url: str
    client: JobSubmissionClient


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free right now (all held open together, then released)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A 2-CPU Ray head with its dashboard, in its own short temp dir and on free ports.

    Started with `ray start --head --block` in a new session and stopped by SIGTERM to that
    process (which tears down exactly the processes it started); `ray stop` is not used because
    it kills every Ray process on the machine by name, other tests' clusters included.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="crj-", dir="/tmp"))  # socket paths: <= 107 chars
    gcs, dashboard, client_server, agent = _free_ports(4)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
        "--object-store-memory=100000000", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent}",
        "--disable-usage-stats",
    ]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=temp_dir)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        client = _wait_for_dashboard(url, head, log_path)
        yield RayHead(temp_dir, url, client)
    finally:
        _stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(url: str, head: subprocess.Popen, log_path: Path,
                        timeout_s: float = 120) -> JobSubmissionClient:
    deadline = time.monotonic() + timeout_s
    while True:
        if head.poll() is not None:
            pytest.fail(f"`ray start` exited with {head.returncode}:\n{log_path.read_text()}")
        try:
            return JobSubmissionClient(url)
        except (ConnectionError, RuntimeError):
            if time.monotonic() > deadline:
                pytest.fail(f"Ray dashboard at {url} not up after {timeout_s} s:\n"
                            f"{log_path.read_text()}")
            time.sleep(1)


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM the blocking `ray start` (it kills the processes it started); SIGKILL its
    process group if that takes over a minute."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def _wait_for_job(client: JobSubmissionClient, job_id: str) -> JobStatus:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(job_id)
    return status


def test_finetune_job_joins_the_cluster_and_logs_to_mlflow(ray_head, tiny_base, tiny_reward,
                                                           tiny_judge, mlflow_store, tmp_path):
    out = tmp_path / "job-run"
    overrides = tiny_finetune_overrides(tiny_base, tiny_reward, tiny_judge, out)
    entrypoint = shlex.join([
        "python", "jobs/finetune.py", "--config", "configs/ctrl_digits_ink.yaml",
        *(arg for override in overrides for arg in ("--set", override)), "--workers", "1",
    ])
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": EXCLUDES,
        "env_vars": {"MLFLOW_TRACKING_URI": mlflow_store, "RAY_AUTH_MODE": "disabled",
                     "OMP_NUM_THREADS": "1"},
    }
    client = ray_head.client
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    try:
        status = _wait_for_job(client, job_id)
    finally:
        if not client.get_job_status(job_id).is_terminal():
            client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs}"
    assert "saved " in logs and str(out / "policy") in logs

    # The job's driver joined this cluster (RAY_ADDRESS from Ray Jobs): its rollout worker and
    # learner actors ran here, under the job's own Ray job id.
    from ray.util.state import list_actors

    driver_job = client.get_job_info(job_id).job_id
    actors = list_actors(address=ray_head.dashboard_url, filters=[("job_id", "=", driver_job)],
                         limit=100, raise_on_missing_output=False)
    assert sorted(a.class_name for a in actors) == ["Learner", "RolloutWorker"]

    # The uploaded working_dir is the package and its configs, not the venv or the data.
    packages = [path for path in (ray_head.temp_dir / "session_latest" / "runtime_resources"
                                  / "working_dir_files").iterdir() if path.is_dir()]
    assert len(packages) == 1
    uploaded = packages[0]
    assert (uploaded / "jobs" / "finetune.py").is_file()
    assert (uploaded / "ctrl_ray" / "data" / "digits.py").is_file()
    assert not any((uploaded / name).exists() for name in (".venv", ".git", "mlflow.db"))

    # Its MLflow run is in the store named by the runtime_env, with the per-iteration reward
    # and the fine-tuned policy as artifacts.
    mlflow_client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    experiment = mlflow_client.get_experiment_by_name("ctrl-ray-finetune")
    runs = mlflow_client.search_runs([experiment.experiment_id],
                                     filter_string=f"params.output_dir = '{out}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["distributed.workers"] == "1"
    history = mlflow_client.get_metric_history(run.info.run_id, "reward")
    assert [m.step for m in history] == [1, 2, 3, 4]
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "policy")}
    assert "policy/adapter.safetensors" in artifacts
