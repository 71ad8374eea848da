"""`make bench`: every benchmark in turn, each printing ratios against a baseline measured in the same run.

    python bench/run_all.py            # full sizes (tens of minutes on 2 CPU cores)
    python bench/run_all.py --quick    # small sizes where a benchmark offers them
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_score.py", "bench_trainer.py", "bench_sample.py", "bench_roofline.py"]
# The roofline at the pipeline's sizes for the whole pool takes hours on 2 CPU cores: here the pivot only, and with
# --quick one small batch.
EXTRA_ARGS = {"bench_roofline.py": ["--models", "smollm2-135m-instruct"]}
QUICK_ARGS = {"bench_trainer.py": ["--quick"], "bench_roofline.py": ["--batch", "8x2", "--max-tokens", "32"]}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = []
    for name in BENCHES:
        args = [sys.executable, str(HERE / name), *EXTRA_ARGS.get(name, []), *(QUICK_ARGS.get(name, []) * quick)]
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run(args).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
