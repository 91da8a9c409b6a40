"""The repository layout: the fixed top level, and tokenizers/ not shadowing Hugging Face's package."""
import subprocess
import sys

from conftest import ROOT

TOP_LEVEL = ["modules", "tokenizers", "trained", "config.py", "train.py", "inference.py", "tools.py",
             "model_comparison.py", "view_modules.ipynb", "model_comparison.ipynb", "requirements.txt",
             "tests", "bench.py", "README.md", ".ci/run"]


def test_top_level_layout():
    assert [name for name in TOP_LEVEL if not (ROOT / name).exists()] == []


def test_tokenizers_folder_does_not_shadow_hugging_face_tokenizers():
    code = "import tokenizers, transformers; print(tokenizers.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout
    assert not (ROOT / "tokenizers" / "__init__.py").exists()
