"""What every bench driver does with its numbers: name the machine, and write its generated table into a doc between
its two markers, so that the hand-written text around them is kept. Run from bench/ as a script's folder:
`from report_blocks import cpu_name, write_between_markers`."""
from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


def cpu_name() -> str:
    """The CPU's model name and the widest vector and bf16 instructions it has: hosts named alike ("AMD EPYC") differ
    there, and bf16 runs several times faster with AVX-512 BF16 than without."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), platform.machine())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    if "amx_bf16" in flags:
        return f"{name} (AMX, AVX-512 BF16)"
    if "avx512_bf16" in flags:
        return f"{name} (AVX-512 BF16)"
    return f"{name} ({'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'}, no bf16 instructions)"


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
