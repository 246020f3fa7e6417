"""Run a two-process DDP (gloo, CPU) script in a subprocess and collect what each rank saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_ddp(tmp_path: Path, body: str, timeout: float = 240.0) -> list[dict]:
    """Write ``body`` as a script and run it; the script must call ``report(dict)`` on every rank.

    The script gets ``OUT`` (a folder) and ``report`` in scope; a hang fails the test by timeout.
    """
    script = tmp_path / "ddp_script.py"
    header = textwrap.dedent(
        f"""
        import json, os, sys
        sys.path.insert(0, {str(TESTS)!r})
        OUT = {str(tmp_path)!r}

        def report(data):
            rank = int(os.environ.get("LOCAL_RANK", 0))
            with open(os.path.join(OUT, f"rank{{rank}}.json"), "w") as f:
                json.dump(data, f)
        """
    )
    script.write_text(header + textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, timeout=timeout, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = []
    for rank in range(2):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} reported nothing\n{proc.stderr[-5000:]}"
        results.append(json.loads(path.read_text()))
    return results
