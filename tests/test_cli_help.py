"""`twinflow --help` and the subcommands' --help import neither torch nor Ray (they stay instant)."""

from __future__ import annotations

import json
import subprocess
import sys

HELPS = ["--help", "train --help", "demo --help", "data --help", "eval --help", "judges --help"]
HELPS += ["export --help", "plan --help", "serve --help", "tune --help", "bogus"]

PROBE = """
import contextlib, io, json, sys
from twinflow.cli import main
heavy = {}
for line in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(line.split())
        except SystemExit:
            pass
    heavy[line] = sorted(m for m in ("torch", "ray", "diffusers", "deepspeed") if m in sys.modules)
print(json.dumps(heavy))
"""


def test_help_imports_no_torch_or_ray():
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(HELPS)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == {line: [] for line in HELPS}
