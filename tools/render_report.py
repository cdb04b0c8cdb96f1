"""Re-render report.md, tradeoff.png and confusion.png from a bench report.json (e.g. one copied back from a Jetson).

    python tools/render_report.py path/to/report.json [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dfad_edge.bench.report import load_report, write_reports
from dfad_edge.errors import DfadError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or args.report.parent
    try:
        report = load_report(args.report)
    except DfadError as exc:
        sys.exit(f"error: {exc}")
    out.mkdir(parents=True, exist_ok=True)
    write_reports(report, out)
    print(f"wrote {out / 'report.md'}, {out / 'tradeoff.png'} and {out / 'confusion.png'}")


if __name__ == "__main__":
    main()
