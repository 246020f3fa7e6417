"""Everything that needs a GPU, in one run: the CUDA tests, then the benchmarks on the device.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 python benchmarks/gpu_check.py --out OUT_DIR
    python benchmarks/gpu_check.py --out "$OUT" --parts issues   # a short lease: the tests, then issues 14 and 15

Each part runs in its own process with its own time limit, its whole output goes to ``OUT_DIR/<part>.log``,
and a summary table (part, exit status, seconds, the lines that carry the result) is printed last. The peers
(PyHessian, hessian-eigenthings, loss-landscapes; curvlinops and hessian-eigenthings 1.x under ``scale/``) are
looked for under ``.peers/`` (``--peers``); a part whose peer is missing still runs ours. ``--budget`` scales every
part's time limit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, command, time limit in seconds, how many trailing lines to keep in the summary)
PY, CUDA = sys.executable, ["--device", "cuda"]
OVERHEAD = [PY, "benchmarks/overhead.py", *CUDA, "--epochs", "40"]
PARTS = [
    ("tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "-rA"], 120, 12),
    ("sam", [PY, "benchmarks/sam.py", *CUDA, "--steps", "200"], 60, 6),
    ("overhead", [*OVERHEAD, "--repeats", "4"], 120, 10),
    ("overhead_idle", [*OVERHEAD, "--repeats", "4", "--schedule", "idle"], 120, 10),
    ("overhead_bare", [*OVERHEAD, "--repeats", "4", "--schedule", "bare"], 120, 10),
    ("hessian", [PY, "benchmarks/hessian.py", *CUDA, "--quick", "--peers-path", "{peers}/hessian"], 60, 14),
    ("landscape", [PY, "benchmarks/landscape.py", *CUDA, "--quick", "--peers-path", "{peers}/landscape"], 50, 8),
    # issue 14 (scale): GPT-2 small (124M, batch 4×1024) and a 1.01B model, with the peers from {peers}/scale
    ("scale_124m", [PY, "benchmarks/scale.py", *CUDA, "--size", "124m", "--peers-path", "{peers}/scale"], 240, 45),
    ("scale_1b", [PY, "benchmarks/scale.py", *CUDA, "--size", "1b", "--reference-hvps", "0"], 240, 45),
    # issue 15: the blocks' batched route ("shared", the GPU default) against restricted products, on the device
    ("blocks", [PY, "benchmarks/blocks.py", *CUDA, "--peers-path", "{peers}/scale"], 120, 16),
]
#: what a short lease should run first (``--parts issues``): the tests and the open issues' device figures
ISSUE_PARTS = "tests,scale_124m,blocks,scale_1b"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--peers", default=str(ROOT / ".peers"))
    parser.add_argument("--budget", type=float, default=1.0, help="multiplies every part's time limit")
    parser.add_argument(
        "--parts", default=",".join(p[0] for p in PARTS), help=f"comma-separated, or 'issues' ({ISSUE_PARTS})"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the bitwise test
    info = subprocess.run(
        [sys.executable, "-c", "import torch, pytorch_lightning as pl; print(torch.cuda.get_device_name(), "
         "'torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', pl.__version__)"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    print("device:", info.stdout.strip() or info.stderr.strip()[-500:], flush=True)
    wanted = set((ISSUE_PARTS if args.parts == "issues" else args.parts).split(","))
    summary = []
    for name, command, limit, keep in PARTS:
        if name not in wanted:
            continue
        command = [c.format(peers=args.peers) for c in command]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit * args.budget
            )
            status, text = str(proc.returncode), proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            status = "timeout"
            text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        seconds = time.perf_counter() - start
        (out / f"{name}.log").write_text(text)
        lines = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
        summary.append((name, status, seconds, lines[-keep:]))
        print(f"== {name}: exit {status} in {seconds:.0f} s", flush=True)
    print("\n# summary")
    for name, status, seconds, lines in summary:
        print(f"## {name}: exit {status}, {seconds:.0f} s")
        for line in lines:
            print("   ", line[:220])


if __name__ == "__main__":
    main()
