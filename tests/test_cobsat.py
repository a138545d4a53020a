"""CoBSAT: prompts against the published rule, the judges' answer rule, the process split, and the whole
run -> judge -> report loop on the mini theme with tiny stand-in models (no downloads)."""

import csv
import hashlib
import json

import pytest
from PIL import Image

from thinkdiff_core.eval import cobsat
from thinkdiff_core.eval.benchmark import ITEMS, SHOTS, TASKS, build_prompt, prompt_list, prompts
from thinkdiff_core.eval.judges import PixelJudge, load_judge, parse_answer, questions
from thinkdiff_core.eval.mini import MINI_TASK_IDS
from thinkdiff_core.eval.runner import split_for_process, work_items

# sha256 of json.dumps(official load_datasets/prompts_list_default.json, sort_keys=True), CoBSAT @ a787be5.
OFFICIAL_PROMPT_LIST_SHA256 = "b85a1b29771b57ee22fdb2a374fade1fe892d69dddf42911dfff73a2be7aa4f2"


def test_prompt_list_is_the_official_file():
    entries = prompt_list()
    assert entries[0] == ((8, 7, 5, 9, 2, 3, 6, 1, 4, 0), (7, 6, 3, 4, 1, 0, 2, 5, 9, 8))  # protocol section 4
    as_json = [{"x_list": list(x), "theta_list": list(t)} for x, t in entries]
    assert hashlib.sha256(json.dumps(as_json, sort_keys=True).encode()).hexdigest() == OFFICIAL_PROMPT_LIST_SHA256


def test_protocol_example_prompt(capsys):
    assert cobsat.main(["prompts", "--task", "1", "--shot", "2", "--limit", "1"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["text_inputs"] == ["blue: ", "brown: ", "orange: "]
    assert line["image_inputs"] == ["color_car/blue_car.jpg", "color_car/brown_car.jpg"]
    assert line["target"] == {"x": "orange", "theta": "car"}


def test_every_task_and_shot_follows_the_rule(cobsat_mini_root):
    for task in TASKS.values():
        for shot in SHOTS:
            for prompt in prompts(task, shot, limit=40):
                x_idx, t_idx = prompt_list()[prompt.index]
                assert len(prompt.image_inputs) == shot and len(prompt.text_inputs) == shot + 1
                assert prompt.theta == task.theta_items[t_idx[shot + 1]]
                assert list(prompt.x_items) == [task.x_items[i] for i in x_idx[: shot + 1]]
                assert len(set(prompt.x_items)) == shot + 1
                for path, x in zip(prompt.image_inputs, prompt.x_items):  # same theta in every demo
                    attribute, obj = task.attribute_and_object(x, prompt.theta)
                    assert path == f"{task.theme}_{obj}/{attribute}_{obj}.jpg"
                assert all(text.endswith(": ") for text in prompt.text_inputs)
                if task.task_id in MINI_TASK_IDS:
                    assert all((cobsat_mini_root / path).is_file() for path in prompt.image_inputs)
                    assert (cobsat_mini_root / task.image_path(*prompt.target_attribute_and_object)).is_file()


def test_item2word_applies_to_words_not_file_names():
    prompt = next(p for p in prompts(TASKS[5], 2) if "3d" in p.x_items[:2])  # Style-I, '3d' among the demos
    position = prompt.x_items.index("3d")
    assert prompt.text_inputs[position] == "wireframe: "
    assert prompt.image_inputs[position].startswith(f"style_{prompt.theta}/3d_")
    assert prompt.vlm_words[position] == "wireframe"
    background = build_prompt(TASKS[4], 4, 0)  # Background-II: theta is a background, raw in the save name
    assert background.save_name.startswith(f"0_{background.theta}_")


@pytest.mark.parametrize(
    "reply, answer",
    [("3.", 3), ("(3)", 3), ("3 or 4", -1), ("", -1), ("10", 10), ("The answer is 7", 7), ("0", -1), ("no idea", -1)],
)
def test_answer_parser(reply, answer):
    assert parse_answer(reply) == answer


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("²", 2),  # superscript two: int() of it raised ValueError and aborted the judge run
        ("①", 1),  # circled one
        ("(⑩)", -1),  # circled ten is not a digit character
        ("٣", 3),  # Arabic-Indic three
        ("３", 3),  # full-width three
        ("𝟕.", 7),  # mathematical bold seven
        ("Ⅻ", -1),  # a Roman numeral is numeric but no digit
        ("½", -1),
        ("0010", 10),  # leading zeros, as int() reads them
        ("9" * 5000, -1),  # past int()'s 4300-digit limit
        ("\x00\ud800?", -1),  # a NUL and a lone surrogate
        ("3\n\n4", -1),
        ("🙂 5 🙂", 5),
        (None, -1),
        (7, -1),  # not text
    ],
)
def test_answer_parser_survives_any_reply(reply, answer):
    assert parse_answer(reply) == answer


def test_questions_are_the_benchmarks():
    asked = questions(TASKS[3])  # Background-I: 'park' shows as 'amusement park', objects are animals
    assert asked["attribute"].startswith(
        "What is the background (of the main object) in this image? Answer from the following options:  (1)beach (2)desert"
    )
    assert " (5)amusement park " in asked["attribute"]
    assert asked["object"] == (
        "What is the main object in this image? Answer from the following options:  (1)zebra (2)tiger (3)sheep (4)pig "
        "(5)monkey (6)lion (7)dog (8)cow (9)cat (10)bird. Answer the number only and do not include any other texts (e.g., 1)."
    )


def test_pixel_judge_reads_every_mini_picture(cobsat_mini_root):
    judge = PixelJudge()
    for obj in ITEMS["object"]:
        for color in ITEMS["color"]:
            verdict = judge.judge(Image.open(cobsat_mini_root / f"color_{obj}/{color}_{obj}.jpg"), TASKS[2])
            assert (verdict.attribute, verdict.object) == (
                ITEMS["color"].index(color) + 1,
                ITEMS["object"].index(obj) + 1,
            )


@pytest.mark.parametrize("num_processes", [1, 2, 3, 4, 7])
def test_split_covers_every_item_once(num_processes):
    for count in (0, 1, 5, 12, 13):
        shares = [split_for_process(count, index, num_processes) for index in range(num_processes)]
        flat = sorted(i for share in shares for i in share)
        assert flat == list(range(count))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_model_judges_run_on_stand_ins(tmp_path, tiny_qwen2vl_dir, cobsat_mini_root):
    from thinkdiff_core import standin

    image = Image.open(cobsat_mini_root / "color_car/red_car.jpg")
    clip = load_judge("clip", standin.build_clip(tmp_path / "clip"))
    verdict = clip.judge(image, TASKS[1], truth=("red", "car"))
    assert 1 <= verdict.attribute <= 10 and 1 <= verdict.object <= 10
    assert verdict.extra["clip_similarity_overall"] >= 0
    qwen = load_judge("qwen2vl", tiny_qwen2vl_dir, max_new_tokens=3)
    verdict = qwen.judge(image, TASKS[1])
    assert verdict.attribute == parse_answer(verdict.extra["response_attribute"])


def run_args(out, data, models_root, flux_dir, *extra):
    return [
        "run", "--data-root", str(data), "--out", str(out), "--vlm", str(models_root / "LLM" / "tiny-qwen2-vl"),
        "--aligner", str(models_root / "thinkdiff" / "tiny-lvlm.safetensors"), "--flux", str(flux_dir), "--tasks", "1",
        "--shots", "2", "--size", "32", "--steps", "1", "--num-tokens", "3", "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def test_run_judge_report_loop_in_all_modes(tmp_path, models_root, tiny_flux_dir, cobsat_mini_root, capsys):
    out = tmp_path / "out"
    modes = ["--modes", "thinkdiff", "text", "hybrid"]
    assert cobsat.main(run_args(out, cobsat_mini_root, models_root, tiny_flux_dir, *modes, "--limit", "1")) == 0
    for mode in ("thinkdiff", "text", "hybrid"):
        for prompt in prompts(TASKS[1], 2, limit=1):
            stem = out / mode / "shot_2" / "task_1" / prompt.save_name
            record = json.loads(stem.with_suffix(".json").read_text())
            assert record["text_inputs"] == prompt.text_inputs and record["image_inputs"] == prompt.image_inputs
            assert isinstance(record["description"], str) and set(record["timings_s"]) >= {"vlm", "flux"}
            assert Image.open(stem.with_suffix(".jpg")).size == (32, 32)
    assert not list(out.rglob("*.tmp"))

    # resume: the first prompt is skipped, only the second is new
    capsys.readouterr()
    assert cobsat.main(run_args(out, cobsat_mini_root, models_root, tiny_flux_dir, "--limit", "2")) == 0
    assert "1 generated, 1 already done, of 2" in capsys.readouterr().out

    # judge 3 prompts: the 3rd image is missing and counts as a wrong row
    judge_args = [
        "judge",
        "--out",
        str(out),
        "--tasks",
        "1",
        "--shots",
        "2",
        *modes,
        "--limit",
        "3",
        "--judge",
        "pixel",
        "--no-progress",
    ]
    assert cobsat.main(judge_args) == 0
    with (out / "evals" / "pixel" / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert {row["mode"] for row in summary} == {"thinkdiff", "text", "hybrid"}
    assert all(row["rows"] == "3" and row["task"] == "Color-I" for row in summary)
    assert {row["missing"] for row in summary} == {"1", "2"}  # thinkdiff has 2 images, text and hybrid 1
    with (out / "evals" / "pixel" / "thinkdiff" / "shot_2" / "task_1_rows.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[-1]["file_path"] == "SUMMARY" and rows[2]["exists"] == "False" and rows[2]["correct"] == "False"

    assert cobsat.main(["report", "--out", str(out), "--note", "STAND-IN"]) == 0
    table = (out / "report" / "cobsat_report.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| shot"))
    assert (
        header.index("Color-I")
        < header.index("Background-I")
        < header.index("Texture-I")
        < header.index("Color-II")
        < header.index("mean")
    )
    assert "ThinkDiff-LVLM (paper)" in table and "0.417" in table and "0.537" in table  # paper and TBDN 2-shot
    assert (out / "report" / "cobsat_report.csv").is_file()
    assert Image.open(out / "report" / "cobsat_report.png").size[0] > 400


def test_run_without_images_names_the_fix(tmp_path, models_root, tiny_flux_dir, capsys):
    assert (
        cobsat.main(run_args(tmp_path / "out", tmp_path / "nowhere", models_root, tiny_flux_dir, "--limit", "1")) == 2
    )
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "yzeng58/CoBSAT" in error and "make-mini" in error


def test_work_items_order_is_fixed():
    items = work_items([1, 2], [2, 4], ["thinkdiff", "text"], limit=3)
    assert len(items) == 2 * 2 * 2 * 3
    assert items == work_items([1, 2], [2, 4], ["thinkdiff", "text"], limit=3)
