import time

import torch
from torch import nn

from tokcomp.adapter import Surgery
from tokcomp.metrics.timers import StageTimer


class Slow(nn.Module):
    def __init__(self, seconds):
        super().__init__()
        self.lin, self.seconds = nn.Linear(2, 2), seconds

    def forward(self, inputs_embeds=None):
        time.sleep(self.seconds)
        return inputs_embeds


def test_stage_timer_splits_prefill_and_decode_and_is_removed():
    vision, llm = Slow(0.02), Slow(0.01)
    s = Surgery()
    t = StageTimer()
    t.attach(s, vision=vision, llm=llm)
    vision(inputs_embeds=torch.zeros(1, 4, 2))
    llm(inputs_embeds=torch.zeros(1, 5, 2))
    for _ in range(3):
        llm(inputs_embeds=torch.zeros(1, 1, 2))
    assert len(t.times.vision) == 1 and t.times.vision[0] >= 0.02
    assert len(t.times.prefill) == 1 and len(t.times.decode) == 3 and t.times.decode_per_token >= 0.01
    s.undo()
    assert not vision._forward_pre_hooks and not llm._forward_hooks
