"""The transformers version matrix: the tiny Qwen2-VL folder has the released layout (so it loads on every leg, as a
downloaded one does), the declared floor is one place, and a CI leg runs the transformers it says it runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import transformers

from thinkdiff_core import hf_compat, standin

ROOT = Path(__file__).resolve().parents[1]

# What Qwen/Qwen2-VL-7B-Instruct ships, less its weight shards (model-0000k-of-00005.safetensors and the index).
RELEASED_QWEN2VL_FILES = {
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
}


def test_tiny_qwen2vl_folder_has_the_released_layout(tiny_qwen2vl_dir):
    names = {path.name for path in tiny_qwen2vl_dir.iterdir()}
    assert RELEASED_QWEN2VL_FILES <= names, RELEASED_QWEN2VL_FILES - names
    assert "processor_config.json" not in names  # transformers 5's own processor file: a 4.x install cannot read it
    config = json.loads((tiny_qwen2vl_dir / "config.json").read_text())
    assert "text_config" not in config and "rope_parameters" not in config  # flat, as the released config.json
    assert config["rope_scaling"]["type"] == "mrope"
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert sum(config["rope_scaling"]["mrope_section"]) == head_dim // 2
    tokenizer_config = json.loads((tiny_qwen2vl_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer"
    preprocessor = json.loads((tiny_qwen2vl_dir / "preprocessor_config.json").read_text())
    assert (preprocessor["image_processor_type"], preprocessor["processor_class"]) == (
        "Qwen2VLImageProcessor",
        "Qwen2VLProcessor",
    )


def test_tiny_qwen2vl_config_is_not_rewritten_by_the_installed_transformers(tiny_qwen2vl_dir):
    """save_pretrained writes each version's own config form; the builder puts the released one back."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_qwen2vl_dir / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in standin.QWEN_SPECIAL_TOKENS}
    config = json.loads((tiny_qwen2vl_dir / "config.json").read_text())
    assert config == standin.qwen2vl_config_dict(tokenizer.get_vocab_size(), ids, hidden_size=64)


def test_tiny_qwen2vl_loads_with_the_real_classes(tiny_vlm):
    """The processor gets a Qwen2 tokenizer (transformers 4.x's processor refuses a generic PreTrainedTokenizerFast),
    and M-RoPE is on, read from rope_scaling in whatever form this version keeps it."""
    assert type(tiny_vlm.processor).__name__ == "Qwen2VLProcessor"
    assert type(tiny_vlm.processor.tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    text = tiny_vlm.model.config.text_config
    rope = getattr(text, "rope_parameters", None) or text.rope_scaling
    assert rope["mrope_section"] == [4, 2, 2]
    tokenizer = tiny_vlm.processor.tokenizer
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == tiny_vlm.model.config.image_token_id
    prompt = tiny_vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "red"}]}], add_generation_prompt=True
    )
    assert (
        prompt == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>red<|im_end|>\n<|im_start|>assistant\n"
    )


def _floor(requirement_lines: list[str]) -> str:
    [floor] = [line.split(">=", 1)[1] for line in requirement_lines if line.startswith("transformers>=")]
    return floor


def test_declared_floor_is_one_version_everywhere():
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert _floor(requirements) == hf_compat.TRANSFORMERS_FLOOR
    # .ci/run reads the floor for its first leg from exactly this line form
    assert f"transformers>={hf_compat.TRANSFORMERS_FLOOR}" in requirements
    assert re.fullmatch(r"[0-9][0-9.]*", hf_compat.TRANSFORMERS_FLOOR)
    assert f"transformers>={hf_compat.TRANSFORMERS_FLOOR}" in (ROOT / "pyproject.toml").read_text()


def test_newest_leg_is_a_pinned_5x_release_above_the_floor():
    from packaging.version import Version

    pins = re.findall(r"^transformers==(\S+)$", (ROOT / "requirements-dev.txt").read_text(), flags=re.M)
    assert len(pins) == 1, "requirements-dev.txt pins the newest tested transformers exactly once"
    assert Version(pins[0]).major == 5 and Version(pins[0]) > Version(hf_compat.TRANSFORMERS_FLOOR)


@pytest.mark.skipif(not os.environ.get("THINKDIFF_TRANSFORMERS"), reason="only on a THINKDIFF_TRANSFORMERS leg")
def test_leg_runs_the_transformers_it_names():
    assert transformers.__version__ == os.environ["THINKDIFF_TRANSFORMERS"]


def test_setup_refuses_a_malformed_transformers_version_in_one_line(tmp_path):
    env = {**os.environ, "THINKDIFF_TRANSFORMERS": "latest", "THINKDIFF_VENV": str(tmp_path / "never-made")}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_env.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "THINKDIFF_TRANSFORMERS=4.57.6" in result.stderr
    assert not (tmp_path / "never-made").exists()
