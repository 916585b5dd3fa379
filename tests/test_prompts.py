import json

import pytest

from slimdiff.errors import SlimDiffError
from slimdiff.prompts import DEFAULT_POOL, EVALUATION_POOL, evaluation_prompts, read_prompts


def test_packaged_pool_is_clean_and_unique():
    prompts = read_prompts()
    assert len(prompts) > 4000
    assert len(set(prompts)) == len(prompts)
    assert all(p == p.strip() and "  " not in p for p in prompts)
    assert DEFAULT_POOL.is_file()


def test_formats(tmp_path):
    (tmp_path / "a.txt").write_text("a cat\n\n  a   dog \na cat\n")
    assert read_prompts(tmp_path / "a.txt") == ["a cat", "a dog"]
    (tmp_path / "b.csv").write_text('id,prompt\n1,"red, blue"\n2,green\n')
    assert read_prompts(tmp_path / "b.csv") == ["red, blue", "green"]
    (tmp_path / "c.tsv").write_text("Prompt\tCategory\nx y\tBasic\n")
    assert read_prompts(tmp_path / "c.tsv") == ["x y"]
    coco = {"annotations": [{"image_id": 2, "id": 5, "caption": "second"}, {"image_id": 1, "id": 9, "caption": "first\n"}]}
    (tmp_path / "d.json").write_text(json.dumps(coco))
    assert read_prompts(tmp_path / "d.json") == ["first", "second"]
    assert read_prompts(tmp_path / "a.txt", limit=1) == ["a cat"]


def test_files_saved_with_a_byte_order_mark(tmp_path):
    """Notepad and Excel ("CSV UTF-8") start UTF-8 files with a byte-order mark: it is no part of the first prompt,
    nor of a table's first column name."""
    bom = "\ufeff"
    (tmp_path / "a.txt").write_text(f"{bom}a cat\r\na dog\r\n", encoding="utf-8")
    assert read_prompts(tmp_path / "a.txt") == ["a cat", "a dog"]
    (tmp_path / "b.csv").write_text(f"{bom}prompt,id\r\nred,1\r\n", encoding="utf-8")
    assert read_prompts(tmp_path / "b.csv") == ["red"]
    coco = {"annotations": [{"image_id": 1, "id": 1, "caption": "only"}]}
    (tmp_path / "c.json").write_text(bom + json.dumps(coco), encoding="utf-8")
    assert read_prompts(tmp_path / "c.json") == ["only"]


@pytest.mark.parametrize("content,suffix", [("\n \n", ".txt"), ("id,other\n1,x\n", ".csv"), ("{}", ".json")])
def test_bad_prompt_files(tmp_path, content, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    with pytest.raises(SlimDiffError):
        read_prompts(path)
    with pytest.raises(SlimDiffError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_evaluation_prompts_are_a_fixed_sample_of_partiprompts_apart_from_the_calibration_pool():
    pool = read_prompts(EVALUATION_POOL)
    assert len(pool) == 1632 and not set(pool) & set(read_prompts())  # no COCO caption among them
    sample = evaluation_prompts(32)
    assert sample == evaluation_prompts(32) and sample != evaluation_prompts(32, seed=1)
    assert set(sample) <= set(pool) and len(set(sample)) == 32
    assert sample != pool[:32] and sample == sorted(sample, key=pool.index)  # spread over the file, in its order
    assert evaluation_prompts(5000) == pool


def test_shared_prompt_sets_parse():
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("shared/data not present beside the checkout")
    assert len(read_prompts(shared / "drawbench.csv")) == 200
    assert len(read_prompts(shared / "PartiPrompts.tsv")) > 1500


def test_the_shipped_proxy_pool_is_the_proxy_training_captions():
    from slimdiff.proxy.shapes import train_captions

    assert read_prompts(model="builtin:proxy") == train_captions()
