"""``workbench probe vhd|context`` and ``workbench reinforce`` from the command line: a good run,
and one clear message + exit 2 for each bad input the issue names."""

from __future__ import annotations

import random

import pytest

from tests.test_cli import run_cli, write_jsonl
from workbench.datasets.shapes import draw
from workbench.runs.parquet import read_parquet


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    rng = random.Random(0)
    for i, (shape, color) in enumerate([("circle", (200, 0, 0)), ("square", (0, 0, 200)), ("triangle", (0, 160, 0))]):
        draw(shape, color, rng).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_vhd_from_a_folder_of_images_writes_head_and_token_rows(image_dir, tmp_path, capsys):
    out = tmp_path / "vhd.parquet"
    rc, stdout, err = run_cli(
        capsys,
        "probe",
        "vhd",
        "--model",
        "tiny-llava",
        "--images",
        str(image_dir),
        "--text",
        "USER: <image>\nWhat color is it? ASSISTANT:",
        "--param",
        "vhd.steps=all",
        "--param",
        "vhd.max_new_tokens=3",
        "--out",
        str(out),
    )
    assert rc == 0, err
    df, meta = read_parquet(out)
    assert set(df.metric) == {"vhd", "image_attention", "t_vhd"}
    assert (df[df.metric == "vhd"].n == 9).all()  # 3 images x 3 steps
    tv = df[df.metric == "t_vhd"]
    assert len(tv) == 9 and set(tv["item"]) == {"0", "1", "2"} and tv["token"].notna().all()
    assert meta["model"]["multimodal"] is True and "3 items" in stdout
    from workbench.report.build import build_report

    page = build_report(out)
    assert "t_vhd per generated token" in page and "vhd per head" in page


def test_reinforce_changes_answers_and_records_them(image_dir, tmp_path, capsys):
    out = tmp_path / "vhr.parquet"
    rc, stdout, err = run_cli(
        capsys,
        "reinforce",
        "--model",
        "tiny-llava",
        "--images",
        str(image_dir),
        "--text",
        "USER: <image>\nWhat is it? ASSISTANT:",
        "--alpha",
        "8",
        "--layers",
        "1-2",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
    )
    assert rc == 0, err
    df, meta = read_parquet(out)
    assert set(df.metric) == {"answer_changed"} and len(df) == 3
    assert meta["config"]["heads"] and all(h.split(".")[0] in ("1", "2") for h in meta["config"]["heads"])
    assert {"baseline", "reinforced", "changed"} <= set(meta["answers"][0])
    assert "answers changed" in stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("unreadable", "cannot read image"),
        ("no-placeholder", "placeholders"),
        ("text-model", "text model and cannot take images"),
        ("no-context", "no 'context' passage"),
    ],
)
def test_bad_vhd_input_gives_one_clear_message(case, message, image_dir, tmp_path, capsys):
    model, probe = "tiny-llava", "vhd"
    row = {"id": "x", "text": "USER: <image> what ASSISTANT:", "image": "0.png"}
    if case == "missing":
        row["image"] = "nope.png"
    elif case == "unreadable":
        row["image"] = "notes.txt"
    elif case == "no-placeholder":
        row["text"] = "USER: what is it ASSISTANT:"
    elif case == "text-model":
        model = "tiny-llama"
    elif case == "no-context":
        model, probe = "tiny-llama", "context"
    items = write_jsonl(image_dir / f"{case}.jsonl", [row])
    out = tmp_path / "o.parquet"
    rc, stdout, err = run_cli(capsys, "probe", probe, "--model", model, "--prompts", str(items), "--out", str(out))
    assert rc == 2
    assert message in err and "fix:" in err and "Traceback" not in err
    assert not out.exists()


def test_text_probes_refuse_image_items_and_vhd_needs_images(tmp_path, capsys):
    rc, _, err = run_cli(
        capsys,
        "probe",
        "vhd,entropy",
        "--model",
        "tiny-llava",
        "--dataset",
        "shapes",
        "--out",
        str(tmp_path / "o.parquet"),
    )
    assert rc == 2 and "carry images" in err and "fix:" in err
    rc, _, err = run_cli(
        capsys, "probe", "vhd", "--model", "tiny-llava", "--out", str(tmp_path / "o.parquet")
    )  # prose: no images
    assert rc == 2 and "placeholder" in err
    assert not (tmp_path / "o.parquet").exists()
