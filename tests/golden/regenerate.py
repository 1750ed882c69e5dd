"""Rewrite report_keys.json from the report that test_report.py checks (after a deliberate schema change).

python tests/golden/regenerate.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from click.testing import CliRunner  # noqa: E402
from test_report import GOLDEN, key_paths, report_args  # noqa: E402

from qconvert.cli import cli  # noqa: E402
from qconvert.report import SCHEMA_VERSION  # noqa: E402

with tempfile.TemporaryDirectory() as folder:
    result = CliRunner().invoke(cli, report_args(HERE.parent.parent / "samples", Path(folder)))
    keys = sorted(key_paths(json.loads(result.stdout)))
old = set(json.loads(GOLDEN.read_text())["keys"])
print("added:", sorted(set(keys) - old), "\nremoved:", sorted(old - set(keys)))
GOLDEN.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "keys": keys}, indent=1) + "\n")
