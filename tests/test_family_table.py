"""benchmarks/family_table.py: its dry run (tiny widths, 64 px, every family) prints the whole table, so the
script that fills the per-family table of benchmarks/README.md cannot rot. No timing is asserted."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_prints_a_row_for_every_family():
    run = subprocess.run([sys.executable, "benchmarks/family_table.py", "--dry-run"], cwd=REPO, capture_output=True,
                         text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [ln for ln in run.stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| family")]
    families = [ln.split("|")[1].strip() for ln in rows]
    assert families == ["SD1.x", "SD-XL", "Flux", "SD3", "Lumina2", "QwenImage"], run.stdout
    for line in rows:
        ratios = re.findall(r"(\d+\.\d+)x", line)
        assert len(ratios) == 5 and all(float(r) > 0 for r in ratios), line
    assert re.search(r"\| Flux \|.*\| vanilla_tlora r 32, r_min 1, prodigy, attention \|", run.stdout)
