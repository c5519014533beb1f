import subprocess
import sys

from quiver import __version__


def run_quiver(*args: str) -> subprocess.CompletedProcess:
    code = "from quiver.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    result = run_quiver("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"quiver {__version__}"
    assert "LoRA experts" in run_quiver("--help").stdout


def test_python_dash_m_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "quiver.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout.strip()) == (0, f"quiver {__version__}")
