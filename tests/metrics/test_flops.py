"""The FLOPs model against hand-computed small cases, and KV bytes against a real cache."""
import pytest
import torch

from tokcomp.metrics import flops as F


def test_vision_block_hand_computed():
    d = F.VisionDims(width=4, heads=2, mlp=8, mlp_mats=2)
    # two segments of 3 and 1 tokens:
    #   qkv 2*4*4*12 = 384; attention 4*(3*3 + 1*1)*2*2 = 160; out 2*4*4*4 = 128; mlp 2 * (2*4*4*8) = 512
    assert F.vision_block(d, [3, 1]) == 384 + 160 + 128 + 512


def test_vision_block_with_extra_kv_and_mlp_subset():
    d = F.VisionDims(width=4, heads=2, mlp=8, mlp_mats=3)
    # 2 queries, 5 keys in one segment, MLP on 2:
    #   qkv 2*2*4*12 = 192, extra kv 2*3*4*8 = 192, attention 4*2*5*2*2 = 160, out 2*2*4*4 = 64, mlp 3*2*2*4*8 = 384
    assert F.vision_block(d, [2], [5], mlp_tokens=2) == 192 + 192 + 160 + 64 + 384


def test_llm_layer_is_gqa_aware():
    d = F.LLMDims(width=8, heads=4, kv_heads=2, head_dim=2, mlp=16, vocab=10, layers=2)
    # q 2*3*8*8 = 384, k+v 2*(2*3*8*4) = 384, attention 4*3*3*4*2 = 288, o 2*3*8*8 = 384, mlp 3*2*3*8*16 = 2304
    assert F.llm_layer(d, 3, 3) == 384 + 384 + 288 + 384 + 2304
    assert F.prefill(d, [3, 3]) == 2 * (384 + 384 + 288 + 384 + 2304) + 2 * 8 * 10
    with pytest.raises(ValueError):
        F.prefill(d, [3])
    assert F.decode_step(d, [3, 2]) == F.llm_layer(d, 1, 4) + F.llm_layer(d, 1, 3) + 160


def test_merger():
    d = F.VisionDims(width=4, heads=1, mlp=4, merger_in=16, merger_hidden=16, out=8)
    assert F.merger(d, 3) == 2 * 3 * 16 * 16 + 2 * 3 * 16 * 8


def test_kv_bytes_measured_equals_formula_on_a_real_cache():
    from transformers import DynamicCache, Qwen2Config
    cfg = Qwen2Config(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                      intermediate_size=32, vocab_size=50)
    cache = DynamicCache(config=cfg)
    lengths = [7, 7, 4]
    for i, n in enumerate(lengths):
        k = torch.zeros(2, 2, n, 4, dtype=torch.bfloat16)
        cache.update(k, k.clone(), i)
    d = F.LLMDims(width=16, heads=4, kv_heads=2, head_dim=4, mlp=32, vocab=50, layers=3)
    assert F.kv_bytes(cache) == 2 * F.kv_bytes_formula(d, lengths, 2)     # batch of 2 rows
