"""Sum up an intake fuzz campaign's report (see tests/test_intake_fuzz.py): outcomes and the decoder's maxima."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def main(paths: list[str]) -> None:
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    ran = [r for r in rows if r["decoder_ran"]]
    measured = [r for r in ran if r["peak_rss_kib"] is not None]
    print(f"{len(rows)} examples, decoder ran on {len(ran)}, killed by a limit {len(ran) - len(measured)}")
    print("outcomes:", dict(Counter(r["outcome"] for r in rows).most_common()))
    if measured:
        peak = max(measured, key=lambda r: r["peak_rss_kib"])
        cpu = max(measured, key=lambda r: r["cpu_s"])
        print(f"max decoder peak RSS {peak['peak_rss_kib'] / 1024:.1f} MiB ({peak['case']})")
        print(f"max decoder CPU {cpu['cpu_s']:.2f} s ({cpu['case']})")
    if ran:
        wall = max(ran, key=lambda r: r["decoder_wall_s"])
        print(f"max decoder wall {wall['decoder_wall_s']:.2f} s ({wall['case']})")
    slowest = max(rows, key=lambda r: r["wall_s"])
    print(f"max wall for a whole intake {slowest['wall_s']:.2f} s ({slowest['case']})")


if __name__ == "__main__":
    main(sys.argv[1:])
