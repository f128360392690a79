"""The design card's layout and the architecture's promises: configs in the top-level conf/, installed as a
package; `sample` and `eval` load without Lightning. (A wheel finds its configs: tests/test_install.py trains
from one; the import layers are checked by `make lint`.)"""

import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest

from diffusion_lab.runs.overrides import CONFIG_MODULE

ROOT = Path(__file__).resolve().parent.parent


def test_an_editable_install_reads_the_top_level_conf_folder():
    assert Path(str(files(CONFIG_MODULE))).resolve() == ROOT / "conf"
    assert files(CONFIG_MODULE).joinpath("train.yaml").is_file()


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_and_eval_import_without_lightning(command):
    probe = (
        f"import sys, diffusion_lab.commands.{command}, diffusion_lab.families; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_top_level_holds_the_cards_layout():
    for name in ("pyproject.toml", "README.md", "diffusion_lab", "conf", "experiments", "tests", "Makefile"):
        assert (ROOT / name).exists(), name
    assert not (ROOT / "diffusion_lab" / "conf").exists()
