"""study.py --launcher slurm against a real SLURM: a cluster of this machine, as
../shared/slurm/up.sh brings one up (docs/clusters.md). Opt-in: `python -m pytest -m slurm`
(pytest.ini leaves the mark out, so the suite never submits to a cluster it finds, a login
node's included); skipped, saying why, when no cluster answers or its node is not idle.

One tiny study (the teacher cache build, then a CE run and a kd run as an array after it) runs
through the local launcher and through SLURM; on SLURM the CE job is cancelled while it waits for
the build (a failed run, as --status and sacct say) and the kd job is requeued with `scontrol
requeue` mid-training. The same command resubmits the failed run; the study's runs and report
then equal the local launcher's (run meanwhile, on the cache the cluster built), the requeued
run's weights bitwise."""
import json
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from helpers import REPO, report
from kd.record import TIMING_COLUMNS
from kd.synthetic import write_fake_cifar100
from study import OUTPUT_FILE
from test_study_runs import without_train_time

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CLUSTER = ["--launcher", "slurm", "--gpus_per_run", "0", "--cpus_per_gpu", "1",
           "--mem_gb_per_gpu", "2", "--timeout_min", "20"]


def idle_cluster() -> str | None:
    """Why no test can run here (None: a SLURM cluster answers with an idle node)."""
    if shutil.which("sinfo") is None:
        return "no sinfo on PATH: no SLURM here (../shared/slurm/up.sh brings one up)"
    try:
        nodes = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True,
                               text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if nodes.returncode != 0:
        return f"sinfo failed: {nodes.stderr.strip()[:200]}"
    if "idle" not in nodes.stdout.split():
        return f"no idle node (sinfo: {' '.join(nodes.stdout.split()) or 'none'})"
    return None


@pytest.fixture(scope="module")
def cluster(request):
    markexpr = request.config.getoption("markexpr")
    if not re.search(r"(?<!not )\bslurm\b", markexpr):
        pytest.skip("submits to a real cluster: ask for it with -m slurm")
    why = idle_cluster()
    if why:
        pytest.skip(why)


def study(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "study.py"), *argv], capture_output=True,
                          text=True, timeout=600, cwd=REPO)


def sacct(job_id: str) -> str:
    """The job's state as SLURM's accounting has it ('' while it has no record of its own: an
    array's elements have none until they start or are cancelled)."""
    out = subprocess.run(["sacct", "-X", "--noheader", "--parsable2", "--format=State", "-j",
                          job_id], capture_output=True, text=True, timeout=30).stdout
    lines = out.split("\n")[:-1]
    return lines[-1].split()[0] if lines else ""  # 'CANCELLED by 0': the state's word


def squeue(job_id: str) -> str:
    """The job's state in the queue ('' once it has left it)."""
    return subprocess.run(["squeue", "--noheader", "--format=%T", "--jobs", job_id],
                          capture_output=True, text=True, timeout=30).stdout.strip()


def wait_for(condition, what: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.5)


def log_values(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "log.csv").drop(columns=list(TIMING_COLUMNS))


def test_a_study_on_a_real_slurm(cluster, runs_root, tmp_path, request):
    data = tmp_path / "data"
    write_fake_cifar100(str(data), n_train=200, n_test=50, seed=3)
    argv = ["--seeds", "0", "--teacher_ckpt", str(runs_root / "teacher" / "best.pt"),
            "--method", "kd", "--T", "4", "--val_size", "100", "--data_dir", str(data),
            "--epochs", "10", "--batch_size", "50", "--eval_batch_size", "50", "--no-download"]
    local, remote = tmp_path / "local", tmp_path / "slurm"
    command = ["--out_dir", str(remote), *argv, *CLUSTER]
    submitted = study(command)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    jobs = json.loads((remote / "jobs.json").read_text())["runs"]
    ids = {name: str(entry["job_id"]) for name, entry in jobs.items()}
    assert set(ids) == {"teacher cache", "ce/seed0", "kd-T4/seed0"}
    assert ids["ce/seed0"].split("_")[0] == ids["kd-T4/seed0"].split("_")[0]  # one array
    assert squeue(ids["ce/seed0"]) == "PENDING"  # after the build (afterok)
    subprocess.run(["scancel", ids["ce/seed0"]], check=True, timeout=30)
    kd_run = remote / "kd-T4" / "seed0"
    wait_for(lambda: (kd_run / "last.pt").exists(), "the kd run's first epoch")
    assert not (kd_run / "summary.json").exists()  # mid-run (SIGTERM lands epochs later)
    subprocess.run(["scontrol", "requeue", ids["kd-T4/seed0"]], check=True, timeout=30)
    # meanwhile, the same study through the local launcher on the cache the cluster built (the
    # kd job waited for it): one run at a time, each with the suite's threads (OMP_NUM_THREADS,
    # which sbatch passed on to the jobs); it runs while the cluster requeues and resubmits
    with open(tmp_path / "reference.out", "w") as output:
        reference = subprocess.Popen(
            [sys.executable, str(REPO / "study.py"), "--out_dir", str(local), "--jobs", "1",
             *argv, "--teacher_cache", str(remote / "teacher_cache.pt")],
            stdout=output, stderr=subprocess.STDOUT, cwd=REPO)
    request.addfinalizer(lambda: reference.poll() is None and reference.kill())
    wait_for(lambda: sacct(ids["kd-T4/seed0"]) == "COMPLETED", "the requeued kd job", 400)
    assert sacct(ids["teacher cache"]) == "COMPLETED"
    assert sacct(ids["ce/seed0"]) == ""  # an element cancelled as it waited: never a record

    status = study([*command, "--status"])
    assert status.returncode == 0, status.stderr
    assert "2 jobs: 1 failed, 1 done" in status.stdout, status.stdout  # the cache: built
    assert re.search(r"failed +ce/seed0 +job \S+ ended: no record", status.stdout), status.stdout
    starts = [line for line in (kd_run / OUTPUT_FILE).read_text().splitlines()
              if line.startswith("$ ")]
    assert len(starts) == 2 and starts[1].endswith(" --resume")  # requeued, resumed

    again = study(command)  # the failed run, and only it, submitted again
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("\nsubmitted ") == 1 and "submitted ce/seed0" in again.stdout
    resubmitted = str(json.loads((remote / "jobs.json").read_text())["runs"]["ce/seed0"]["job_id"])
    wait_for(lambda: sacct(resubmitted) == "COMPLETED", "the resubmitted CE job")
    assert "study complete" in study([*command, "--wait"]).stdout  # nothing left to wait for

    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.out").read_text()

    for name in ("ce/seed0", "kd-T4/seed0"):  # the same runs, the requeued one bitwise
        pd.testing.assert_frame_equal(log_values(remote / name), log_values(local / name),
                                      check_exact=True, obj=name)
        for file in ("best.pt", "last.pt"):
            ours, theirs = (torch.load(root / name / file, weights_only=True)["model"]
                            for root in (remote, local))
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), (name, file)
    ours, theirs = (without_train_time(report(root, "--out", tmp_path / f"report_{root.name}",
                                              "--no-cost").replace(str(root), "STUDY"))
                    for root in (remote, local))
    assert ours == theirs
