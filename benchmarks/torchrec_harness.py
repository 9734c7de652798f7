"""TorchRec's own sharding harness (``sharding_single_rank_test``) over compressed models.

Every method (none, AFM, SVD, PQ, MEC) x forced sharding type (table-, row-, column-,
table-row-wise, data-parallel) x pooling (SUM, MEAN, SUM beside MEAN) x a feature read by two
tables or not, on 2 gloo processes: TorchRec's harness trains one SGD step sharded and unsharded
and compares the predictions (``torchrec_compress.testing.torchrec_harness``).  Prints one line
per case and the pass / refuse / fail counts.

Usage::

    python -m benchmarks.torchrec_harness --world-size 2
"""

import argparse
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import astuple

from torchrec_compress.testing.multiprocess import run_multiprocess
from torchrec_compress.testing.torchrec_harness import harness_cases, run_harness_cases


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated case-name prefixes")
    args = p.parse_args(argv)
    cases = harness_cases()
    if args.only:
        cases = [c for c in cases if any(c.name.startswith(s) for s in args.only.split(","))]
    start = time.monotonic()
    results = run_multiprocess(
        run_harness_cases,
        world_size=args.world_size,
        timeout_s=3600,
        cases=[astuple(c) for c in cases],
    )
    worst = {"pass": 0, "refuse": 1, "fail": 2}
    counts: Counter[str] = Counter()
    by_method: dict[str, Counter[str]] = {}
    for case, *per_rank in zip(cases, *results, strict=True):
        status = max((r[1] for r in per_rank), key=worst.__getitem__)
        detail = next((r[2] for r in per_rank if r[1] == status), "")
        counts[status] += 1
        by_method.setdefault(case.method, Counter())[status] += 1
        print(f"{status:<6} {case.name}  {detail.splitlines()[0] if detail else ''}"[:220])
    print()
    for method, c in by_method.items():
        print(f"{method:<6} pass {c['pass']:>3}  refuse {c['refuse']:>3}  fail {c['fail']:>3}")
    print(
        f"\n{len(cases)} cases on {args.world_size} processes in "
        f"{(time.monotonic() - start) / 60:.1f} min: {counts['pass']} pass, "
        f"{counts['refuse']} refuse, {counts['fail']} fail"
    )
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
