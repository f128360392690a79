"""The package as a user installs it: a wheel in a fresh virtualenv, run from an unrelated folder."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.test_commands import ENV

ROOT = Path(__file__).resolve().parent.parent


def test_a_wheel_in_a_fresh_virtualenv_trains_from_an_unrelated_folder(tmp_path):
    # Built from a copy: setuptools leaves build/ behind, and a stale build/ would leak into later wheels.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".*", "build", "*.egg-info", "__pycache__", "outputs", "multirun", "lightning_logs"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path / "dist",
            source,
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("diffusion_lab-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
        check=True,
        capture_output=True,
    )
    # The dependencies (torch & co.) come from this environment: a path line in a .pth file, which adds the
    # folder without running its own .pth files, so this checkout's editable install stays out of sight.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [python, "-c", "import diffusion_lab; print(diffusion_lab.__file__)"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(venv)), where
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            venv / "bin" / "diffusion-lab",
            "train",
            "debug=fast",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=elsewhere,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "pipeline" / "model_index.json").exists() and "Finished at step 6" in result.stdout
