"""SLURM suite (tests/slurm, marker `slurm`): real `hydra/launcher=slurm` multiruns on a SLURM
cluster reachable from this machine (`scripts/slurm_cluster.sh` starts a one-node one).

Where no cluster answers the tests are skipped with the reason, unless METACL_REQUIRE_SLURM=1
(CI's .ci/run sets it after starting the cluster): then they fail, so a broken cluster set-up
is never mistaken for a pass. `pytest -m "not slurm"` leaves them out altogether.

They act as the cluster's administrator (requeued jobs start at once, get longer limits), so
they only use the cluster that script starts (ClusterName=metacl), never a site's real one
(e.g. from a login node), unless METACL_SLURM_CLUSTER names that one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache

import pytest

TEST_CLUSTER = "metacl"  # scripts/slurm_cluster.sh's ClusterName
HINT = "start one with `sudo scripts/slurm_cluster.sh` (or run `make test-slurm`)"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/slurm/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.slurm)


def _cluster_name() -> str | None:
    config = subprocess.run(["scontrol", "show", "config"], check=False, capture_output=True,
                            text=True, timeout=20).stdout
    found = re.search(r"^ClusterName\s*=\s*(\S+)", config, re.MULTILINE)
    return found.group(1) if found else None


@cache
def cluster_problem() -> str | None:
    """None when sbatch can submit to an up controller with a usable node, else why not."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "no SLURM client commands (sbatch, scontrol) on PATH"
    try:
        ping = subprocess.run(["scontrol", "ping"], check=False, capture_output=True,
                              text=True, timeout=20)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], check=False,
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"SLURM does not answer ({err})"
    if "is UP" not in ping.stdout:
        said = (ping.stdout + ping.stderr).strip().splitlines()
        return f"the SLURM controller is not up ({said[0] if said else 'scontrol ping'})"
    name, wanted = _cluster_name(), os.environ.get("METACL_SLURM_CLUSTER", TEST_CLUSTER)
    if name != wanted:
        return (f"the SLURM cluster here is {name!r}, not {wanted!r} (scripts/slurm_cluster.sh's "
                f"is {TEST_CLUSTER!r}; METACL_SLURM_CLUSTER={name} runs these tests on it)")
    usable = [s for s in nodes.stdout.split() if s.rstrip("*~#") in ("idle", "mix", "alloc")]
    if not usable:
        return f"no usable SLURM node (sinfo: {nodes.stdout.split() or nodes.stderr.strip()})"
    return None


@pytest.fixture(scope="session", autouse=True)
def _needs_cluster():
    """Session-wide, so it runs before the module fixtures that submit jobs."""
    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get("METACL_REQUIRE_SLURM") == "1":
        pytest.fail(f"METACL_REQUIRE_SLURM=1 but {problem}; {HINT}", pytrace=False)
    pytest.skip(f"{problem}; {HINT}")
