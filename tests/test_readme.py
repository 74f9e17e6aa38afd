"""The README's opening example runs as written (on tiny data)."""

import pathlib

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    code = README.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    assert "kt.TapModel" in code and "fit(" in code
    rng = np.random.default_rng(0)
    namespace = {
        "x": rng.random((8, 96, 96, 3), dtype="float32"),
        "y": rng.integers(0, 10, size=8),
    }
    monkeypatch.chdir(tmp_path)
    exec(code.replace("epochs=5", "epochs=1, verbose=0"), namespace)
    history = namespace["history"].history
    assert {"loss", "predictions_loss", "sparse_loss", "early_loss"} <= set(
        history
    )
    assert (tmp_path / "deploy.keras").is_file()
