"""trainers/metrics.py on fixed small embeddings, against values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from likeness.trainers import metrics as M


class TableEncoder:
    """An ``ImageEncoder`` that looks each image up by its first pixel's red value (its index)."""

    def __init__(self, table, tower=None):
        self.table, self.tower, self.calls = torch.tensor(table, dtype=torch.float32), tower, 0

    def embed(self, images):
        self.calls += 1
        return self.table[images[:, 0, 0, 0].round().long()]


class Text:
    def __init__(self, tower, vectors):
        self.tower, self.vectors, self.seen = tower, vectors, []

    def embed_text(self, prompts):
        self.seen.extend(prompts)
        return torch.tensor([self.vectors[p] for p in prompts], dtype=torch.float32)


def images(*idx):
    x = torch.zeros(len(idx), 4, 4, 3)
    x[:, 0, 0, 0] = torch.tensor(idx, dtype=torch.float32)
    return x


# embeddings: 0, 1 = references; 2, 3 = generated
CLIP = [[1, 0], [0, 1], [1, 0], [1, 1]]
DINO = [[1, 0, 0], [1, 0, 0], [0, 1, 0], [3, 4, 0]]
R2 = 1 / math.sqrt(2)


def test_clip_i_dino_and_diversity_are_the_mean_cosines():
    rep = M.evaluate(images(0, 1), images(2, 3), TableEncoder(CLIP), TableEncoder(DINO))
    # image 2 = (1,0): cos to refs 1 and 0 -> 0.5; image 3 = (1,1): R2 to both -> R2
    assert rep.per_image["CLIP-I"] == pytest.approx([0.5, R2])
    assert rep.clip_i.value == pytest.approx((0.5 + R2) / 2)
    # DINO: image 2 = (0,1,0) is orthogonal to both refs (1,0,0): 0; image 3 = (3,4,0): 0.6
    assert rep.per_image["DINO"] == pytest.approx([0.0, 0.6])
    assert rep.dino.value == pytest.approx(0.3)
    # diversity on the DINO embeddings: 1 - cos((0,1,0), (0.6,0.8,0)) = 0.2
    assert rep.diversity.value == pytest.approx(0.2)
    assert rep.clip_t.value is None and "text tower" in rep.clip_t.reason
    # combined without CLIP-T: sqrt(geomean(CLIP-I, DINO) * diversity)
    s = math.sqrt(rep.clip_i.value * 0.3)
    assert rep.combined.value == pytest.approx(math.sqrt(s * 0.2))
    assert "diversity" in rep.combined.formula


def test_diversity_uses_clip_without_dino_and_needs_two_images():
    rep = M.evaluate(images(0), images(2, 3), TableEncoder(CLIP))
    assert rep.dino.value is None and rep.diversity.value == pytest.approx(1 - R2)
    assert M.diversity(torch.ones(1, 3)).value is None
    one = M.evaluate(images(0), images(2), TableEncoder(CLIP))
    assert one.diversity.value is None and one.combined.value is None and "2 generated" in one.combined.reason


def test_clip_t_scores_each_image_against_its_prompt_with_the_class_noun():
    clip = TableEncoder(CLIP, tower="vit-test")
    text = Text("vit-test", {"a photo of dog": [0, 1], "a dog on the beach": [1, 1]})
    rep = M.evaluate(images(0, 1), images(2, 3), clip, text=text,
                     prompts=["a photo of sks dog", "a sks on the beach"], word="sks", class_noun="dog")
    assert text.seen == ["a photo of dog", "a dog on the beach"]
    # generated (1,0) to (0,1): 0; (1,1) to (1,1): 1
    assert rep.per_image["CLIP-T"] == pytest.approx([0.0, 1.0])
    assert rep.clip_t.value == pytest.approx(0.5)
    # margin: image 1: 0 - cos((1,0),(1,1)) = -R2; image 2: 1 - cos((1,1),(0,1)) = 1 - R2
    assert rep.clip_t_margin.value == pytest.approx((1 - 2 * R2) / 2)
    assert rep.combined.value == 0.0  # a negative margin: the images fit the other prompts better
    assert "CLIP-T margin" in rep.combined.formula


def test_the_clip_t_margin_is_the_prompt_factor_and_zero_when_the_prompt_is_ignored():
    clip = TableEncoder(CLIP + [[0, 1]], tower="vit-test")
    text = Text("vit-test", {"a dog": [1, 0], "a dog at night": [0, 1]})
    follows = M.evaluate(images(0, 1), images(2, 4), clip, text=text, prompts=["a dog", "a dog at night"])
    # each image is its own prompt's (cosine 1) and orthogonal to the other: margin 1
    assert follows.clip_t.value == pytest.approx(1.0) and follows.clip_t_margin.value == pytest.approx(1.0)
    assert follows.combined.value == pytest.approx(math.sqrt(follows.clip_i.value * 1.0))
    # the training photo whatever the prompt: CLIP-T still 0.5 x 2 / 2, the margin 0
    ignores = M.evaluate(images(0, 1), images(2, 2), clip, text=text, prompts=["a dog", "a dog at night"])
    assert ignores.clip_t.value == pytest.approx(0.5) and ignores.clip_t_margin.value == pytest.approx(0.0)
    assert ignores.combined.value == 0.0
    # one prompt for every image: no margin, raw CLIP-T is the factor
    one = M.evaluate(images(0, 1), images(2, 4), clip, text=text, prompts=["a dog"])
    assert one.clip_t_margin.value is None and "at least two" in one.clip_t_margin.reason
    assert one.combined.value == pytest.approx(math.sqrt(one.clip_i.value * one.clip_t.value))
    assert "x CLIP-T)" in one.combined.formula


@pytest.mark.parametrize("text_tower,image_tower", [("openclip-vit-bigg-14", "openai-vit-l-14"),
                                                    ("openai-vit-l-14", None), (None, "openai-vit-l-14")])
def test_mismatched_or_unknown_towers_are_refused_before_any_work(text_tower, image_tower):
    clip = TableEncoder(CLIP, tower=image_tower)
    text = Text(text_tower, {"a photo of dog": [0, 1]})
    with pytest.raises(ValueError, match="same CLIP model"):
        M.evaluate(images(0, 1), images(2, 3), clip, text=text, prompts=["a photo of dog"])
    assert clip.calls == 0 and text.seen == []


def test_class_noun_replacement():
    f = M.with_class_noun
    assert f("a photo of sks dog", "sks", "dog") == "a photo of dog"
    assert f("a photo of sks on the beach", "sks", "dog") == "a photo of dog on the beach"
    assert f("<likeness>, in the snow", "<likeness>", "cat") == "cat, in the snow"
    assert f("SKS Dog asks sks", "sks", "dog") == "Dog asks dog"  # whole words, any case
    assert f("a photo of sks", "", "dog") == "a photo of sks"
    assert f("a photo of sks", "sks", "") == "a photo of"


def test_prompts_one_per_image_or_one_for_all():
    assert M.prompt_list(["a", ""], 3) == ["a", "a", "a"]
    assert M.prompt_list(["a", "b"], 2) == ["a", "b"]
    assert M.prompt_list([], 2) is None
    with pytest.raises(ValueError, match="one prompt per image"):
        M.prompt_list(["a", "b"], 3)


def test_embeddings_of_different_widths_are_refused():
    with pytest.raises(ValueError, match="different widths"):
        M.cosine_matrix(torch.ones(2, 3), torch.ones(2, 4))


def test_table_lists_every_image_and_the_reasons():
    rep = M.evaluate(images(0, 1), images(2, 3), TableEncoder(CLIP))
    table = rep.table()
    lines = table.splitlines()
    assert lines[0].split() == ["image", "CLIP-I", "DINO", "CLIP-T", "diversity", "combined"]
    assert lines[1].split()[:2] == ["1", "0.5000"] and lines[3].split()[0] == "all"
    assert "DINO: no DINO model given" in table and "combined = sqrt(" in table
