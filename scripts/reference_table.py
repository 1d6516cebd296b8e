"""Put `metabench table results/reference` into README.md between its reference-table markers.

    python scripts/reference_table.py          # after new reference runs landed in results/reference
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from bench.cli import main as metabench

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- reference-table:start -->", "<!-- reference-table:end -->"


def main() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if metabench(["table", str(REPO / "results" / "reference")]) != 0:
            raise SystemExit("metabench table failed")
    readme = REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{out.getvalue().strip()}\n{END}{tail}", encoding="utf-8")
    print(f"README.md: reference table updated ({out.getvalue().count(chr(10))} lines)")


if __name__ == "__main__":
    main()
