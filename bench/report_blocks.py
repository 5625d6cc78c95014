"""What every bench driver does with its numbers: name the machine, and write its generated table into a doc between
its two markers, so that the hand-written text around them is kept. Run from bench/ as a script's folder:
`from report_blocks import cpu_name, write_between_markers`."""
from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_between_markers(text: str, markers: tuple[str, str], doc: Path = BENCHMARKS, title: str | None = None,
                          new_doc: str = "# Benchmarks\n") -> None:
    """Replace what lies between the markers in `doc`; the first time, append the block (under `## title` if given)."""
    begin, end = markers
    block = f"{begin}\n{text}\n{end}"
    current = doc.read_text(encoding="utf-8") if doc.is_file() else new_doc
    if begin in current and end in current[current.index(begin):]:
        current = current[:current.index(begin)] + block + current[current.index(end, current.index(begin)) + len(end):]
    else:
        current = current.rstrip("\n") + "\n\n" + (f"## {title}\n\n" if title else "") + block + "\n"
    doc.write_text(current, encoding="utf-8")
