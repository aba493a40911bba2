"""A real Slurm cluster for tests, started and stopped by the test process itself.

``SlurmCluster(workdir, nodes=2).start()`` runs a private ``munged`` (own socket and pid file, so it never
touches a system munge or another test session's cluster), writes ``slurm.conf`` with free ports and
state dirs under ``workdir``, starts ``slurmctld`` and one ``slurmd`` per node in the foreground as child
processes and waits until every node is idle. Several nodes live on this one machine: each ``slurmd`` has
its own node name and port on 127.0.0.1 (names ``ticod-n1``, ``ticod-n2``, ... are added to /etc/hosts
when they do not resolve, since the trainer connects to the first node by name). Client commands get ``SLURM_CONF`` through :attr:`SlurmCluster.env`.
``stop()`` cancels this cluster's jobs and ends the daemons by their process ids.

Needs root (slurmd runs jobs as the submitting user, munged runs as the ``munge`` user) and the Debian
packages ``slurm-wlm`` and ``munge``; :func:`ensure_slurm` installs them with apt-get when missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

BINARIES = (
    "munged",
    "munge",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "scancel",
    "sinfo",
    "squeue",
)
SBIN = ("/usr/sbin", "/usr/bin")
FINISHED = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
)

# torchrun's variables: a job must not inherit them from the test process (a test that ran DeepSpeed
# in-process sets them); a submit() that wants them, to check they are ignored, passes them in env.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be brought up on this machine; the message says why (the tests asked for fail with it)."""


def slurm_requested() -> bool:
    """``TICOD_TEST_SLURM=1``: the Slurm tests were asked for, so a missing prerequisite fails them."""
    return os.environ.get("TICOD_TEST_SLURM") == "1"


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def ensure_slurm(install: bool = True) -> None:
    """Make sure the Slurm and munge binaries exist, installing them with apt-get when allowed.

    Raises:
        SlurmUnavailable: not root, no apt-get, or the install failed (with its output).
    """
    missing = [b for b in BINARIES if which(b) is None]
    if not missing:
        return
    if not install:
        raise SlurmUnavailable(f"missing {', '.join(missing)} (install slurm-wlm and munge)")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"missing {', '.join(missing)} and not root, so cannot apt-get install them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"missing {', '.join(missing)} and no apt-get to install slurm-wlm/munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    still = [b for b in BINARIES if which(b) is None]
    if still:
        raise SlurmUnavailable(f"still missing after apt-get install slurm-wlm munge: {', '.join(still)}")


def ensure_resolvable(names: Sequence[str]) -> None:
    """Make node names resolve (to 127.0.0.1 through /etc/hosts) where they do not yet.

    Raises:
        SlurmUnavailable: a name does not resolve and /etc/hosts cannot be written.
    """
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if not missing:
        return
    try:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # TICOD test Slurm nodes\n")
    except OSError as e:
        raise SlurmUnavailable(f"node names {missing} do not resolve and /etc/hosts is read-only: {e}") from e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Job:
    """One job as ``scontrol show job`` reports it."""

    job_id: int
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, REQUEUED, ...
    exit_code: int
    exit_signal: int
    restarts: int
    fields: dict[str, str]


class SlurmCluster:
    """A Slurm cluster of ``nodes`` nodes on this machine, living under ``workdir`` (see the module docstring).

    ``cpus`` is per node; more than the machine has is allowed (the test jobs are small).
    """

    def __init__(
        self, workdir: str | Path, cpus: int | None = None, partition: str = "debug", nodes: int = 1
    ) -> None:
        self.workdir = Path(workdir)
        self.cpus = cpus or os.cpu_count() or 1
        self.partition = partition
        self.host = socket.gethostname().split(".")[0]
        # One node is this host itself; several get names of their own, all served from this host.
        self.nodes = [self.host] if nodes == 1 else [f"ticod-n{i}" for i in range(1, nodes + 1)]
        self.conf = self.workdir / "slurm.conf"
        # munged checks that every directory above its socket is reachable by all users; pytest's
        # tmp dirs are 0700, so the munge dir lives directly under the system temp dir.
        self.munge_dir = Path(tempfile.mkdtemp(prefix="ticod-munge-"))
        self._procs: dict[str, subprocess.Popen] = {}
        self._munged_pid: int | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and jobs (jobs inherit it through sbatch)."""
        path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        return {**env, "SLURM_CONF": str(self.conf), "PATH": path}

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 60) -> SlurmCluster:
        """Start munged, slurmctld and a slurmd per node; return once every node is idle."""
        ensure_slurm()
        for d in ("state", "logs", *(f"spool-{n}" for n in self.nodes)):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        try:
            ensure_resolvable(self.nodes)
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", [which("slurmd"), "-D", "-f", str(self.conf), "-N", node])
            idle = ["idle"] * len(self.nodes)
            self._wait(lambda: self.node_states() == idle, timeout_s, "every node to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel this cluster's jobs, then end slurmd, slurmctld and munged by their pids."""
        if self._procs and self.conf.exists():
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False)
                self._wait(lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(), 60, None)
        for proc in reversed(self._procs.values()):  # slurmds before slurmctld
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if self._munged_pid is not None:
            _kill_pid(self._munged_pid)
            self._munged_pid = None
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_munged(self) -> None:
        self.munge_dir.chmod(0o755)
        shutil.chown(self.munge_dir, "munge", "munge")
        d = self.munge_dir
        cmd = [
            which("munged"),
            f"--socket={d / 'munge.sock'}",
            f"--pid-file={d / 'munged.pid'}",
            f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        ]
        # munged refuses to run as root; the package's munge user owns the key.
        r = subprocess.run(["runuser", "-u", "munge", "--", *cmd], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SlurmUnavailable(
                f"munged failed ({r.returncode}): {r.stderr.strip()} {self._log('munged')}"
            )
        self._munged_pid = int((d / "munged.pid").read_text())
        check = subprocess.run(
            f"{which('munge')} -n -S {d / 'munge.sock'} | unmunge -S {d / 'munge.sock'}",
            shell=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise SlurmUnavailable(f"munge -n | unmunge failed: {check.stderr.strip()}")

    def _write_conf(self) -> None:
        w = self.workdir
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(
            f"""\
ClusterName=ticodtest
SlurmctldHost={self.host}
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_dir / "munge.sock"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation={w / "state"}
SlurmdSpoolDir={w / "spool-%n"}
SlurmctldPidFile={w / "slurmctld.pid"}
SlurmdPidFile={w / "slurmd-%n.pid"}
SlurmctldLogFile={w / "logs" / "slurmctld.log"}
SlurmdLogFile={w / "logs" / "slurmd-%n.log"}
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# Finished jobs stay visible to `scontrol show job` for the whole test session.
MinJobAge=3600
KillWait=30
{nodes}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, cmd: Sequence[str | None]) -> None:
        out = open(self.workdir / "logs" / f"{name}.stdout", "wb")  # noqa: SIM115 (lives as long as the daemon)
        proc = subprocess.Popen([str(c) for c in cmd], env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self._procs[name] = proc
        time.sleep(0.5)
        if proc.poll() is not None:
            raise SlurmUnavailable(f"{name} exited with {proc.returncode}: {self._log(name)}")

    def _log(self, name: str) -> str:
        files = [self.workdir / "logs" / f"{name}.log", self.workdir / "logs" / f"{name}.stdout"]
        files.append(self.munge_dir / "munged.log")
        texts = [f.read_text(errors="replace")[-3000:] for f in files if name in f.name and f.exists()]
        return "\n".join(texts)

    def _wait(self, ready: Callable[[], bool], timeout_s: float, what: str | None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            for name, proc in self._procs.items():
                if proc.poll() is not None and what is not None:
                    raise SlurmUnavailable(f"{name} died ({proc.returncode}): {self._log(name)}")
            time.sleep(0.5)
        if what is not None:
            raise SlurmUnavailable(
                f"timed out after {timeout_s:.0f} s waiting for {what}; "
                f"sinfo: {self.run(['sinfo'], check=False).stdout.strip()}\n"
                + "\n".join(self._log(name) for name in self._procs)
            )

    # ------------------------------------------------------------------------------------- commands
    def run(
        self, cmd: Sequence[str], check: bool = True, timeout_s: float = 60
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check and r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def node_states(self) -> list[str]:
        """Each node's state (``idle``, ``allocated``, ...), in node order."""
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split() for line in r.stdout.splitlines()) if r.returncode == 0 else {}
        return [states.get(n, "") for n in self.nodes]

    def submit(
        self,
        script: str | Path,
        args: Sequence[str] = (),
        sbatch_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> int:
        """``sbatch`` a script (extra ``env`` reaches the job); returns the job id."""
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
        r = subprocess.run(
            cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True, timeout=60
        )
        if r.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Job:
        """The job's current record (state, exit code, restart count)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        return Job(
            job_id=job_id,
            state=fields.get("JobState", ""),
            exit_code=int(code),
            exit_signal=int(sig or 0),
            restarts=int(fields.get("Restarts", "0")),
            fields=fields,
        )

    def wait(
        self,
        job_id: int,
        until: Callable[[Job], bool] | None = None,
        timeout_s: float = 600,
        poll_s: float = 1.0,
    ) -> Job:
        """Poll the job until ``until(job)`` (default: a final state); raises TimeoutError otherwise."""
        until = until or (lambda j: j.state in FINISHED)
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s:.0f} s: {job.fields}")
            time.sleep(poll_s)

    def signal(self, job_id: int, sig: str = "USR1") -> None:
        """Send ``sig`` to every task of the job's steps (``scancel --signal``)."""
        self.run(["scancel", f"--signal={sig}", str(job_id)])

    def cancel(self, job_id: int) -> None:
        self.run(["scancel", str(job_id)])


def _kill_pid(pid: int, timeout_s: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
