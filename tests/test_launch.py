"""study.py --launcher slurm without a cluster: stand-in sbatch, srun, sinfo and sacct on PATH
check what is submitted (the sbatch files), recorded and resubmitted; the refusals; the DDP
variables a job's tasks get. The runs themselves, through submitit's local executor, are in
test_study_runs.py (the tiny study) and test_resume.py (a preempted run).

These tests never reach a real scheduler, even on a login node: their PATH is the stand-ins, a
folder of the few tools the stand-ins and submitit use (and the interpreter), and after them
decoys of every SLURM command, which fail any test that calls them (the fixture `slurm`).
Nothing of the user's PATH, nor os.defpath (/usr/bin, where Debian's slurm-wlm installs), is on
it."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import submitit

import kd.errors
import study
from helpers import REPO, assert_one_line_error
from kd import job, launch
from kd.distributed import World

SBATCH = """#!/bin/sh
# submitit calls: sbatch FILE; keep the file, answer as SLURM does
[ -n "$FAKE_SBATCH_ERROR" ] && { echo "$FAKE_SBATCH_ERROR" >&2; exit 1; }
n=$(ls "$FAKE_SLURM"/sbatch_*.sh 2>/dev/null | wc -l)
cp "$1" "$FAKE_SLURM/sbatch_$((n + 1)).sh"
echo "Submitted batch job $((1001 + n))"
"""
SINFO = "#!/bin/sh\nprintf 'gpu*\\ncpu\\ngpu*\\n'\n"
SACCT = "#!/bin/sh\necho 'JobID|State|NodeList'\ncat \"$FAKE_SLURM/sacct.txt\" 2>/dev/null\n"
SQUEUE = "#!/bin/sh\ncat \"$FAKE_SLURM/squeue.txt\" 2>/dev/null\n"  # the queued ids, whatever asked


# Every command of a SLURM installation a launcher could call, and what the stand-ins need
SLURM_COMMANDS = ("sbatch", "srun", "sinfo", "sacct", "scontrol", "scancel", "squeue", "salloc",
                  "sstat", "sacctmgr")
TOOLS = ("sh", "ls", "wc", "cp", "cat", "env")
DECOY = "#!/bin/sh\necho \"$0 $*\" >> \"$FAKE_SLURM/reached\"\nexit 1\n"


def write_commands(folder: Path, commands: dict[str, str]) -> Path:
    folder.mkdir()
    for name, text in commands.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def tools_only(folder: Path) -> Path:
    """A folder of links to the tools the stand-ins and submitit use, and this interpreter."""
    folder.mkdir()
    for name in TOOLS:
        (folder / name).symlink_to(shutil.which(name))
    (folder / "python").symlink_to(sys.executable)
    return folder


def search_path(*folders: Path) -> str:
    return os.pathsep.join(map(str, folders))


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A folder of stand-in SLURM commands, first on a PATH of stand-ins, tools and decoys (the
    module docstring); what the stand-ins saw is kept there. A test that called a decoy fails."""
    bin_dir = write_commands(tmp_path / "slurm", {
        "sbatch": SBATCH, "sinfo": SINFO, "sacct": SACCT, "squeue": SQUEUE,
        "srun": "#!/bin/sh\nexit 0\n"})
    decoys = write_commands(tmp_path / "decoys", dict.fromkeys(SLURM_COMMANDS, DECOY))
    monkeypatch.setenv("PATH", search_path(bin_dir, tools_only(tmp_path / "tools"), decoys))
    monkeypatch.setenv("FAKE_SLURM", str(bin_dir))
    submitit.SlurmJob.watcher.clear()  # shared by the jobs of this process: no state carried over
    yield bin_dir
    reached = bin_dir / "reached"
    assert not reached.exists(), f"a test reached past the stand-ins: {reached.read_text()}"


def test_the_slurm_path_holds_only_stand_ins_tools_and_decoys(slurm, tmp_path):
    """Whatever SLURM this machine has, the tests see only the stand-ins, then decoys (the
    commands the stand-ins leave out); no folder of the user's PATH or os.defpath."""
    folders = os.environ["PATH"].split(os.pathsep)
    assert folders == [str(slurm), str(tmp_path / "tools"), str(tmp_path / "decoys")]
    for name in SLURM_COMMANDS:
        found = Path(shutil.which(name))
        assert found.parent in (slurm, tmp_path / "decoys"), name
    assert shutil.which("scontrol") == str(tmp_path / "decoys" / "scontrol")
    subprocess.run(["scontrol", "requeue", "1001"], capture_output=True)  # as a launcher would
    reached = (slurm / "reached").read_text()
    assert "scontrol requeue 1001" in reached
    (slurm / "reached").unlink()  # the decoy works; the fixture's check stays for the others


@pytest.fixture
def study_argv(tmp_path) -> list[str]:
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"stand-in teacher: plan() only hashes it")
    return ["--out_dir", str(tmp_path / "study"), "--teacher_ckpt", str(teacher), "--seeds", "0",
            "1", "--T", "2", "4", "--epochs", "1", "--launcher", "slurm"]


CLUSTER = ["--partition", "gpu", "--timeout_min", "30", "--cpus_per_gpu", "4",
           "--mem_gb_per_gpu", "16", "--array_parallelism", "3", "--sbatch", "account=vision"]


def test_slurm_submits_the_cache_build_then_the_runs_as_one_array_after_it(
        slurm, study_argv, tmp_path, in_process):
    result = in_process("study.py", [*study_argv, *CLUSTER])
    assert result.returncode == 0, result.stderr
    out = tmp_path / "study"
    assert "submitted teacher cache: job 1001" in result.stdout
    assert "submitted ce/seed0: job 1002_0" in result.stdout
    assert "submitted kd-T4/seed1: job 1002_5" in result.stdout
    assert "7 jobs submitted, logs in" in result.stdout
    cache, array = (slurm / "sbatch_1.sh").read_text(), (slurm / "sbatch_2.sh").read_text()
    assert not (slurm / "sbatch_3.sh").exists()
    for text in (cache, array):
        for line in ["--partition=gpu", "--time=30", "--gpus-per-node=1", "--ntasks-per-node=1",
                     "--nodes=1", "--cpus-per-task=4", "--mem=16GB", "--signal=USR2@120",
                     "--account=vision", f"--output={out}/submitit/"]:
            assert f"#SBATCH {line}" in text, line
    assert "--array" not in cache and "--dependency" not in cache
    assert "#SBATCH --array=0-5%3" in array and "#SBATCH --dependency=afterok:1001" in array
    assert "#SBATCH --kill-on-invalid-dep=yes" in array
    jobs = json.loads((out / "jobs.json").read_text())["runs"]
    assert {name: entry["job_id"] for name, entry in jobs.items()} == {
        "teacher cache": "1001", **{name: f"1002_{i}" for i, name in enumerate(
            f"{point}/seed{seed}" for seed in (0, 1) for point in ("ce", "kd-T2", "kd-T4"))}}
    recorded = json.loads((out / "study.json").read_text())
    assert recorded["launchers"][0]["partition"] == "gpu"
    assert recorded["launchers"][0]["sbatch"] == ["account=vision"]

    # the cache was built; the scheduler: one run running, one queued, two failed (one
    # cancelled), two accounting has no record of: one still in the queue, one gone (an array's
    # element cancelled while it waited has no record of its own: a real sacct's way)
    (out / "teacher_cache.pt").write_bytes(b"")
    (slurm / "sacct.txt").write_text("1001|COMPLETED|n1\n1002_0|RUNNING|n1\n1002_1|PENDING|\n"
                                     "1002_2|FAILED|n2\n1002_4|CANCELLED by 42|n2\n")
    (slurm / "squeue.txt").write_text("1002_0\n1002_1\n1002_3\n")
    job_log = out / "submitit" / "1002_2" / "1002_2_0_log.err"  # where SLURM writes it
    job_log.parent.mkdir(parents=True, exist_ok=True)  # submitit made it, for the pickle
    job_log.write_text("slurmstepd: error: Detected 1 oom_kill event in StepId=1002_2.0\n")
    status = in_process("study.py", [*study_argv, *CLUSTER, "--status"])
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].endswith("6 jobs: 1 running, 1 queued, 3 failed, 1 unknown")
    assert "running  ce/seed0  job 1002_0" in lines and "queued   kd-T2/seed0  job 1002_1" in lines
    assert "failed   kd-T4/seed0  job 1002_2 ended: FAILED" in lines
    assert "failed   kd-T2/seed1  job 1002_4 ended: CANCELLED" in lines
    assert "failed   kd-T4/seed1  job 1002_5 ended: no record (cancelled before it started?)" \
        in lines
    assert any(line.startswith("unknown  ce/seed1  job 1002_3 (the scheduler has no record")
               for line in lines)
    assert "  | slurmstepd: error: Detected 1 oom_kill event in StepId=1002_2.0" in lines
    assert not (slurm / "sbatch_3.sh").exists()  # --status submits nothing

    again = in_process("study.py", [*study_argv, *CLUSTER])
    assert again.returncode == 0, again.stderr
    assert "submitted kd-T4/seed0: job 1003_0" in again.stdout  # the failed ones, as one array
    assert "submitted kd-T2/seed1: job 1003_1" in again.stdout
    assert "submitted kd-T4/seed1: job 1003_2" in again.stdout
    assert again.stdout.count("\nsubmitted ") == 3 and "3 jobs submitted" in again.stdout
    resubmitted = (slurm / "sbatch_3.sh").read_text()
    assert "#SBATCH --array=0-2%3" in resubmitted and "--dependency" not in resubmitted
    jobs = json.loads((out / "jobs.json").read_text())["runs"]
    assert (jobs["kd-T4/seed0"]["job_id"], jobs["ce/seed0"]["job_id"]) == ("1003_0", "1002_0")

    local = in_process("study.py", [*study_argv[:-2], "--launcher", "local"])
    assert_one_line_error(local, "jobs of this study are still queued or running")


def test_slurm_refusals_are_one_line_and_write_nothing(slurm, study_argv, tmp_path, in_process,
                                                      monkeypatch):
    out = tmp_path / "study"
    for flags, phrase in [
            (["--partition", "gpus"], "--partition gpus: no such partition (sinfo lists cpu, gpu)"),
            (["--timeout_min", "0"], "--timeout_min: must be >= 1, got 0"),
            (["--gpus_per_run", "16"], "--gpus_per_run 16 is more than a node has "
                                       "(--gpus_per_node 8)"),
            (["--sbatch", "=x"], "--sbatch =x: give an #SBATCH option as KEY=VALUE")]:
        assert_one_line_error(in_process("study.py", [*study_argv, *flags]), phrase)
        assert not out.exists()
    tools = tmp_path / "tools"
    (slurm / "sacct").rename(slurm / "sacct.off")  # no accounting: --wait could never end
    with monkeypatch.context() as m:
        m.setenv("PATH", search_path(slurm, tools))  # and no decoy sacct after the stand-ins
        assert_one_line_error(in_process("study.py", [*study_argv, "--wait"]), "--wait: no sacct")
    assert not out.exists()
    (slurm / "sacct.off").rename(slurm / "sacct")
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tools))  # no SLURM command at all
        missing = in_process("study.py", study_argv)
    assert_one_line_error(missing, "--launcher slurm: no sbatch or srun on PATH",
                          "--launcher local runs the study on this machine")
    assert not out.exists()
    monkeypatch.setenv("FAKE_SBATCH_ERROR", "sbatch: error: Batch job submission failed: "
                                            "Invalid account or account/partition combination")
    refused = in_process("study.py", study_argv)
    assert_one_line_error(refused, "submitting 1 job(s) failed, none of them was submitted: "
                                   "sbatch: error: Batch job submission failed: Invalid account")
    assert not (out / "jobs.json").exists()


def test_each_task_of_a_job_gets_the_variables_torchrun_gives(monkeypatch):
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    env = job.ddp_env(submitit.JobEnvironment())
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert World.from_env() == World(rank=3, local_rank=1, size=4)  # as kd.distributed reads it
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert job.ddp_env(submitit.JobEnvironment()) == {}  # one task: a single process


def test_stop_signals_wait_for_the_end_of_a_submission(monkeypatch):
    """Ctrl-C twice while jobs are submitted: the process neither stops nor exits until their ids
    are recorded; then it knows a stop was asked for."""
    monkeypatch.setattr(kd.errors, "_received", [])
    before = signal.getsignal(signal.SIGINT)
    with kd.errors.stops_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a second one would exit at once outside the block
        recorded = True
    assert recorded and kd.errors.stop_requested()
    assert signal.getsignal(signal.SIGINT) is before  # the handler of before the block is back


@pytest.mark.slow
def test_a_jobs_process_finds_this_repo_and_imports_no_torch(tmp_path):
    """A submitit job's process, started by the executor's interpreter command from another
    folder, has this repository first on its path (it unpickles kd.job.RunJob from it, whatever
    else is installed) and starts without torch's seconds of imports (the run's process imports
    it). The slurm executor sets the same command (kd.launch.cluster.executor) but needs srun."""
    args, _ = study.build_parser().parse_known_args(["--launcher", "submitit_local"])
    python = shlex.split(launch.cluster.executor(args, str(tmp_path))._executor.python)
    code = "import sys, kd.job; print(sys.path[1]); print(kd.job.__file__); print(sorted(m for " \
           "m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    result = subprocess.run([*python, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(REPO), str(REPO / "kd" / "job.py"), "[]"]
