"""How a benchmark publishes its table: printed, and written to its results file."""
from __future__ import annotations

import os


def publish(lines: list[str], path: str) -> str:
    """Join `lines` into the table, print it, write it to `path` (folders made); return it."""
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(table + "\n")
    return table
