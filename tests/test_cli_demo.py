"""`vmmu demo` is the README's first command: it must run and report on a fresh server."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("mmu", ["tdp", "legacy"])
def test_demo_runs_faults_at_4k_and_2m_and_completes_an_mmio_exit(mmu):
    done = subprocess.run([sys.executable, "-m", "vmmu.cli", "demo", "--accesses", "3000",
                           "--mmu", mmu], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"the {mmu} MMU" in out
    assert "MMIO exits completed by the client: 1" in out
    assert "guest write read back through the hva: b'vmmu-ok!'" in out
    mapped = out.split("pages mapped:")[1].split()
    assert mapped[0] == "4K" and int(mapped[1].replace(",", "")) > 0
    assert mapped[2] == "2M" and int(mapped[3].replace(",", "")) > 0
