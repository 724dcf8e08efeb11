"""benchmarks/gpu_suite.sh, the benchmarks to run where a GPU is lent: its dry run on this machine checks that
every script it names exists and accepts every flag it passes (a renamed flag fails here, not on the GPU)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _dry_run(**env):
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PY": sys.executable, **env}, timeout=600)


def test_dry_run_passes_and_lists_every_step():
    run = _dry_run()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "dry run ok (7 steps)" in run.stdout
    assert "--flux-tokens 512 --latent 128" in run.stdout  # Flux at 1024 px: 64 x 64 = 4096 image tokens


def test_dry_run_fails_on_a_flag_a_script_does_not_accept(tmp_path):
    suite = (REPO / "benchmarks" / "gpu_suite.sh").read_text().replace("--rounds 2 --memory-steps 2 --no-estimate",
                                                                       "--rounds 2 --no-such-flag --no-estimate")
    copy = REPO / "benchmarks" / f"gpu_suite_test_{os.getpid()}.sh"
    copy.write_text(suite)
    try:
        run = subprocess.run(["bash", str(copy), "--dry-run"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "PY": sys.executable}, timeout=600)
    finally:
        copy.unlink()
    assert run.returncode != 0 and "does not accept --no-such-flag" in run.stdout, run.stdout
