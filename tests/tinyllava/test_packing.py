"""Packing one image's questions into one training sequence gives the logits of separate sequences."""
from __future__ import annotations

import torch

from tokcomp.tinyllava import data
from tokcomp.tinyllava.features import image_features
from tokcomp.tinyllava.packing import pack, packed_logits


def test_pack_mask_positions_and_targets_on_a_toy_case():
    p = pack(3, [([10, 11], [20, 2]), ([12], [21, 22, 2])])
    # layout: image 0..2 | seg0: 10 11 20 2 | seg1: 12 21 22 2
    assert p.text_ids.tolist() == [10, 11, 20, 2, 12, 21, 22, 2]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6]]
    m = p.mask[0, 0]
    assert m.shape == (11, 11)
    assert torch.equal(m[:3, :3], torch.ones(3, 3, dtype=torch.bool).tril()) and not m[:3, 3:].any()
    assert m[3:7, :3].all() and torch.equal(m[3:7, 3:7], torch.ones(4, 4, dtype=torch.bool).tril())
    assert not m[3:7, 7:].any() and not m[7:, 3:7].any()        # segments never see each other
    assert m[7:, :3].all() and torch.equal(m[7:, 7:], torch.ones(4, 4, dtype=torch.bool).tril())
    # the token before each answer token predicts it
    assert p.pred_index.tolist() == [4, 5, 7, 8, 9]
    assert p.targets.tolist() == [20, 2, 21, 22, 2]
    assert p.segment_of_target.tolist() == [0, 0, 1, 1, 1]


def test_packed_logits_equal_separate_full_model_forwards(tiny_llava):
    model, processor = tiny_llava
    tok = processor.tokenizer
    qs = data.heldout_questions(2)[:1]
    image = data.load_image(qs[0].image_path)
    group = [q for q in data.load_split("test") if q.image_id == qs[0].image_id][:3]
    segs = [(tok(data.prompt(q.text, image=False)).input_ids, tok(data.target(q.answer)).input_ids +
             [tok.eos_token_id]) for q in group]
    packed = pack(model.config.image_seq_length, segs)
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        got = packed_logits(model, model.model.multi_modal_projector(image_features(model, pixels)[0]), packed)
        for s, q in enumerate(group):
            inputs = processor(images=[image], text=[data.prompt(q.text) + data.target(q.answer)],
                               return_tensors="pt")
            # the processor's ids are exactly: image tokens, the prompt's ids, the answer's ids
            assert inputs["input_ids"][0, model.config.image_seq_length:].tolist() == segs[s][0] + segs[s][1][:-1]
            ref = model(**inputs).logits[0, -len(segs[s][1]):]
            torch.testing.assert_close(got[packed.segment_of_target == s], ref, atol=2e-4, rtol=1e-4)
