"""The README's first command: the offline stand-in run of the whole graph, ending in a PNG and the VLM text."""

import importlib.util
from pathlib import Path

from PIL import Image

from thinkdiff_core.standin import STANDIN_LABEL

ROOT = Path(__file__).resolve().parents[1]


def load_demo():
    spec = importlib.util.spec_from_file_location("thinkdiff_demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_writes_png_and_text(tmp_path, capsys):
    demo = load_demo()
    assert demo.main(["--output-dir", str(tmp_path), "--num-tokens", "5", "--size", "32"]) == 0
    image = Image.open(tmp_path / "thinkdiff_standin.png")
    assert image.size == (32, 32)
    assert len(set(image.getdata())) > 10  # a rendered image, not a blank one
    text = (tmp_path / "thinkdiff_standin.txt").read_text()
    assert text.startswith(STANDIN_LABEL)
    out = capsys.readouterr().out
    assert "STAND-IN" in out and "(1, 5, 4096)" in out and "(1, 5, 64)" in out
    assert (tmp_path / "thinkdiff_standin_card.png").exists()
