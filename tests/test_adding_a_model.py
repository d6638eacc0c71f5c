"""A model defined outside the package, registered in a few lines, trains, evaluates and
samples through the Python API and the command line's machinery: the README's example, run
as written."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Adding a model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path):
    (tmp_path / "example.py").write_text(readme_example())
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    values = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(elbo|iwae|fivo) \d+ (-?[\d.]+) nats per step", out, re.M)}
    assert set(values) == {"elbo", "iwae", "fivo"}
    assert values["elbo"] < values["iwae"]  # 16 samples tighten the bound of the trained model
    assert "torch.Size([2, 30, 2])" in out
    assert re.search(r"linear-ssm on npz/test \(16 examples\), log-likelihood estimate with k=64", out)
    assert re.search(r"active units: \d of 4", out)  # latent diagnostics through the registry entry
    assert re.search(r"written .*runs/ssm/samples\.png", out)
    assert re.search(r"training linear-ssm \(18 parameters\) on npz \(64 train / 16 valid\)", out)  # --model.z_size=2
    assert "run folder:" in out


def test_an_unregistered_model_is_a_clear_error():
    from seqvae.cli import main

    assert main(["train", "linear-ssm"]) == 2
