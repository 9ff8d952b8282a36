"""`python -m fused_opt`: the diagnostic report and its sanity check."""

import subprocess
import sys


def test_report_lists_build_backends_and_passes_the_sanity_check():
    out = subprocess.run(
        [sys.executable, "-m", "fused_opt"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = out.stdout
    for section in ("fused_opt 0.", "torch 2.", "built:", "runs here:", "backends available:"):
        assert section in report
    import fused_opt

    for backend in fused_opt.available_backends():
        if backend != "cuda":
            assert f"AdamW  {backend:6s} cpu" in report
    assert "FAILED" not in report
