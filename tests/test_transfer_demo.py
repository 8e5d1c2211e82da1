"""`shardsync transfer-demo` (the transport alone) works and says what it did."""

from __future__ import annotations

import subprocess
import sys


def test_transfer_demo_syncs_twice_exactly_over_channels_created_once():
    result = subprocess.run([sys.executable, "-m", "shardsync.cli", "transfer-demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("engine ranks exact after the update: 4/4") == 2, out
    assert "pp0-tp0-to-tp0   trainer pp0 tp0  engine 0,1 tp0" in out
    assert "memberships created: 6 at connect, 0 during 2 updates" in out, out
