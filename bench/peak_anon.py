#!/usr/bin/env python3
"""Runs a command and reports its wall time and peak memory as one JSON line:
peak RssAnon (anonymous memory: what the process allocated, not counting the
pages of memory-mapped files, which the kernel can drop) sampled from
/proc/PID/status every 50 ms, and peak RSS (VmHWM, mapped pages included).

usage: peak_anon.py LABEL -- CMD ARGS...
"""

import json
import subprocess
import sys
import time


def status(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def main():
    label = sys.argv[1]
    cmd = sys.argv[sys.argv.index("--") + 1 :]
    start = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_rss = 0
    tail = []
    import threading

    def drain():
        for line in p.stderr:
            tail.append(line)
            del tail[:-20]
            print(f"  [{label}] {line.rstrip()}", file=sys.stderr, flush=True)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    while p.poll() is None:
        s = status(p.pid)
        peak_anon = max(peak_anon, s.get("RssAnon", 0))
        peak_rss = max(peak_rss, s.get("VmHWM", 0))
        time.sleep(0.05)
    t.join()
    wall = time.time() - start
    print(
        json.dumps(
            {
                "label": label,
                "command": cmd,
                "exit": p.returncode,
                "seconds": round(wall, 1),
                "peak_rss_anon_bytes": peak_anon,
                "peak_rss_bytes": peak_rss,
            }
        ),
        flush=True,
    )
    if p.returncode != 0:
        print("".join(tail), file=sys.stderr)
        sys.exit(p.returncode)


if __name__ == "__main__":
    main()
