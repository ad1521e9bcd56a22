"""Where in a run its memory peaks: resident memory sampled over time next to the run's own progress.

Usage: python bench/rss_timeline.py OUT.json -- COMMAND [ARGS...]

Runs COMMAND, samples its resident set (``/proc/PID/status`` VmRSS, Linux) every ``--every``
seconds and reads its stderr line by line (offsite's phase lines and progress bars, carriage
returns split into lines), timestamping both. Writes the samples, the stderr lines and the peak
with the last stderr line before it (the phase the peak happened in) to OUT.json, and prints the
peak and the highest sample within each phase. ru_maxrss says how high a run went; this says when.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import threading
import time
from pathlib import Path


def _rss_mib(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match[1]) / 1024 if match else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--every", type=float, default=0.1, help="seconds between samples")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    started = time.time()
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    lines, samples = [], []

    def read():
        buffer = b""
        while chunk := proc.stderr.read1(4096):
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            lines.extend((round(time.time() - started, 2), d.decode(errors="replace").strip()) for d in done if d.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = _rss_mib(proc.pid)
        if rss is not None:
            samples.append((round(time.time() - started, 2), round(rss, 1)))
        time.sleep(args.every)
    reader.join(timeout=5)
    peak_t, peak = max(samples, key=lambda s: s[1]) if samples else (0.0, 0.0)
    before = [text for t, text in lines if t <= peak_t]
    phases = {}  # highest sample while each stderr line was the latest one (bars collapsed to their label)
    index = 0
    for t, rss in samples:
        while index < len(lines) and lines[index][0] <= t:
            index += 1
        label = re.split(r":\s+\d+%|\s+\.\.\.", lines[index - 1][1])[0] if index else "(start)"
        phases[label] = max(phases.get(label, 0.0), rss)
    record = {"command": command, "returncode": proc.returncode, "seconds": round(time.time() - started, 1),
              "peak_mib": peak, "peak_at_s": peak_t, "peak_after_line": before[-1] if before else None,
              "phase_peaks_mib": phases, "samples": samples, "stderr": lines}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"peak {peak:.0f} MiB at {peak_t:.1f}s, after: {record['peak_after_line']}")
    for label, rss in sorted(phases.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {rss:8.0f} MiB  {label[:100]}")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
