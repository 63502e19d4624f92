"""easy-VQA loading, the fixed held-out set, prompt and answer normalisation."""
from __future__ import annotations

import pytest

from tokcomp.tinyllava import data


@pytest.mark.parametrize("text, expected", [
    (" yes", "yes"), (" Yes.", "yes"), ("No\n\nThe image", "no"), (" te" + "al", "teal"), ("  Circle!", "circle"),
    ("", ""), (" 42", ""), ("\n red shape", "red"),
])
def test_normalize_takes_the_first_lowercase_word(text, expected):
    assert data.normalize(text) == expected


def test_exact_match_compares_normalised_first_words():
    assert data.is_correct(" Rectangle.", "rectangle")
    assert not data.is_correct(" a rectangle", "rectangle")
    assert not data.is_correct(" yes no", "no")


def test_prompt_with_and_without_the_image_placeholder():
    assert data.prompt("what shape is present?") == "<image>\nQuestion: what shape is present?\nAnswer:"
    assert data.prompt("what shape is present?", image=False) == "\nQuestion: what shape is present?\nAnswer:"
    assert data.target("teal") == " teal"


def test_kind_is_read_from_the_answer():
    q = lambda a: data.Question("?", a, 0, "", "test")   # noqa: E731
    assert [q(a).kind for a in ("yes", "no", "circle", "triangle", "teal", "gray")] == \
        ["yes/no", "yes/no", "shape", "shape", "color", "color"]


def test_heldout_set_is_fixed_distinct_images_of_the_test_split(needs_easy_vqa):
    qs = data.heldout_questions()
    assert len(qs) == 500 and len({q.image_id for q in qs}) == 500
    assert all(q.split == "test" and q.answer in data.answers() for q in qs)
    assert data.heldout_questions() == qs                       # deterministic
    assert data.heldout_questions(40) == qs[:40]                # prefixes are the same questions
    first = [(q.image_id, q.text, q.answer) for q in qs[:3]]
    assert first == EXPECTED_FIRST_THREE


def test_monitor_images_are_disjoint_from_the_heldout_images(needs_easy_vqa):
    held = {q.image_id for q in data.heldout_questions()}
    mon = {q.image_id for q in data.monitor_questions()}
    assert len(mon) == 500 and not held & mon


def test_splits_have_the_documented_sizes(needs_easy_vqa):
    train, test = data.load_split("train"), data.load_split("test")
    assert (len(train), len({q.image_id for q in train})) == (38575, 4000)
    assert (len(test), len({q.image_id for q in test})) == (9673, 1000)
    with pytest.raises(ValueError, match="use 'train' or 'test'"):
        data.load_split("val")


# pins the held-out set (seeded shuffles of the test images and of each image's questions)
EXPECTED_FIRST_THREE = [(439, "is there a black shape in the image?", "no"),
                        (621, "is there not a gray shape in the image?", "yes"),
                        (160, "is no red shape present?", "yes")]
