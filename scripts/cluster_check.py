"""The main job on a multi-node Ray cluster, on one CPU machine: placement and byte-identical outputs.

    python scripts/cluster_check.py [--config configs/quickstart.yaml] [--workers 2] [--set key=value ...]
                                    [--work DIR] [--keep]

1. A local run for reference: `rayforge run CONFIG --out WORK/local` (a private local Ray; GPUs asked for, none
   here, so it says it runs on CPU).
2. A cluster started with `ray.cluster_utils.Cluster` (nodes of their own, as `ray start` makes them, stopped by
   handle when done): a head that declares no CPU and no GPU (as `cluster.yaml`'s head: it runs drivers only) and
   WORKERS nodes that declare one CPU and one logical GPU each. Without CUDA those GPUs compute on CPU.
3. `ray job submit --working-dir . -- python jobs/run.py CONFIG --out WORK/cluster ...` against it, with the job's
   RAYFORGE_DATA passed in its runtime_env (only the job's driver reads the data).
4. Checks: every placement entry (training, forging, shadows, original scoring, rebuild) is on a worker node with a
   GPU, none on the head; the forge and rebuild stages used at least two worker nodes; and every output file of
   the cluster run equals the local run's byte for byte, except the files that record time or placement.
Exit status 0 when every check passes. The settings default to the quickstart shrunk by SMALL (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data.subset=200", "train.epochs=2", "train.batch_size=20", "forge.mu=4", "forge.lam=10",
         "attack.shadows=4", "attack.shadow_epochs=1", "ray.actors=auto", "ray.num_gpus_per_actor=1",
         "ray.num_cpus_per_actor=1"]
# Files that record wall time or where work ran (they differ by nature); everything else must be identical.
TIMED = ("train_summary.json", "summary.json", "progress.json")
TIMED_DIRS = ("metrics", "wandb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> dict:
    """Ports of one node's own services, so several nodes (and other Ray instances) share this machine."""
    return {"dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
            "metrics_agent_port": free_port(), "runtime_env_agent_port": free_port(),
            "min_worker_port": 0, "max_worker_port": 0}


def start_cluster(workers: int):
    from ray.cluster_utils import Cluster

    dashboard = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard, "gcs_server_port": free_port(), **node_ports()})
    for _ in range(workers):
        cluster.add_node(num_cpus=1, num_gpus=1, **node_ports())
    cluster.wait_for_nodes()
    return cluster, f"http://127.0.0.1:{dashboard}"


def wait_for_dashboard(url: str, timeout: float = 120.0) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5).close()
            return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"the cluster's dashboard at {url} did not come up within {timeout:.0f} s")
            time.sleep(2)


def run(cmd: list[str], env: dict, log: Path, cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); last lines of {log}:\n{tail}")
    return time.perf_counter() - start


def compared_files(run_dir: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and path.name not in TIMED and rel.parts[0] not in TIMED_DIRS:
            out[str(rel)] = path
    return out


def placements(run_dir: Path) -> dict[str, list[dict]]:
    found = {"train": json.loads((run_dir / "train_summary.json").read_text())["placement"]}
    for stage in ("forge", "attack"):
        for summary in sorted((run_dir / stage).glob("*/summary.json")):
            found[f"{stage}/{summary.parent.name}"] = json.loads(summary.read_text())["placement"]
    return found


def check(local: Path, remote: Path, head: str, workers: set[str]) -> list[str]:
    failures = []
    where = placements(remote)
    for stage, entries in where.items():
        for e in entries:
            if e["node"] == head or e["node"] not in workers or not e["gpus"]:
                failures.append(f"{stage}: an actor ran on {e['node'][:12]} with GPUs {e['gpus']} (head "
                                f"{head[:12]})")
        used = {e["node"] for e in entries if e["units"] and e.get("role") in (None, "rebuild")}
        if stage != "train" and len(used) < 2:  # the forge and rebuild actors
            failures.append(f"{stage}: units ran on {len(used)} worker node(s), expected >= 2")
    a, b = compared_files(local), compared_files(remote)
    if set(a) != set(b):
        failures.append(f"different files: only local {sorted(set(a) - set(b))[:5]}, only cluster "
                        f"{sorted(set(b) - set(a))[:5]}")
    differ = [k for k in sorted(set(a) & set(b)) if a[k].read_bytes() != b[k].read_bytes()]
    failures += [f"differs from the local run: {k}" for k in differ]
    print(f"compared {len(set(a) & set(b))} files byte for byte: {len(differ)} differ")
    for stage, entries in where.items():
        print(f"  {stage:<14} " + ", ".join(f"{e.get('role', 'actor')}@{e['node'][:8]} gpus={e['gpus']} "
                                          f"units={e['units']}" for e in entries))
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", default=None, help="working directory (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rf-cluster-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sets = [x for s in SMALL + args.overrides for x in ("--set", s)]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rfc", dir="/tmp"))  # short: socket paths
    os.environ["RAY_TMPDIR"] = env["RAY_TMPDIR"]

    local_s = run([sys.executable, "-m", "rayforge.cli", "run", args.config, "--out", str(work / "local"), *sets],
                  env, work / "local.log")
    print(f"local run: {local_s:.1f} s -> {work / 'local'}")

    cluster, dashboard = start_cluster(args.workers)
    try:
        head = cluster.head_node.node_id
        workers = {n.node_id for n in cluster.worker_nodes}
        wait_for_dashboard(dashboard)
        runtime_env = {"env_vars": {"RAYFORGE_DATA": os.environ.get("RAYFORGE_DATA", ""), "WANDB_MODE": "disabled"},
                       "excludes": [".git", ".venv", "runs", "wandb"]}
        job_s = run(["ray", "job", "submit", "--address", dashboard, "--working-dir", str(ROOT),
                     "--runtime-env-json", json.dumps(runtime_env), "--",
                     "python", "jobs/run.py", args.config, "--out", str(work / "cluster"), *sets], env, work / "job.log")
        print(f"cluster job ({args.workers} GPU worker nodes, head with 0 CPU/0 GPU): {job_s:.1f} s "
              f"-> {work / 'cluster'}")
    finally:
        cluster.shutdown()
    failures = check(work / "local", work / "cluster", head, workers)
    for f in failures:
        print(f"FAIL: {f}")
    print("cluster check: " + ("FAILED" if failures else "passed"))
    if not args.keep and not failures and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
