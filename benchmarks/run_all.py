"""``make bench``: run every benchmark in this folder, one after another (each prints its own ratio;
app_load.py, the web app under 20 concurrent clients for 30 s, prints a latency table and runs last)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).parent
    for script in sorted(here.glob("*.py"), key=lambda p: (p.name == "app_load.py", p.name)):
        if script.name == "run_all.py":
            continue
        print(f"== {script.name}", flush=True)
        sys.argv = [str(script)]
        runpy.run_path(str(script), run_name="__main__")
