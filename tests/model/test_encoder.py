"""The encoder (``model.causal = false``): bidirectional attention in GQA and MLA, the masked-LM
loss on the selected positions only, and no KV cache or generation."""

import pytest
import torch
import torch.nn.functional as F

import moelab
from moelab.config import ConfigError
from moelab.model.attention import AttentionContext
from moelab.model.linear_cross_entropy import IGNORE_INDEX

SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.vocab_size=64",
         "model.ffn_hidden=48", "model.moe.expert_hidden=16", "model.moe.num_experts=4",
         "model.max_seq_len=16"]
MLA = ["model.attention=mla", "model.mla.kv_lora_rank=16", "model.mla.qk_nope_head_dim=8",
       "model.mla.qk_rope_head_dim=4", "model.mla.v_head_dim=8"]


def _model(causal: bool, attention: str, preset: str = "moe"):
    extra = (MLA if attention == "mla" else ["model.n_kv_heads=1"]) + [f"model.causal={str(causal).lower()}"]
    return moelab.build(preset, SMALL + extra).double().eval()


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("causal", [True, False])
def test_a_future_token_changes_earlier_outputs_only_in_an_encoder(attention, causal):
    model = _model(causal, attention)
    a = torch.randint(0, 64, (2, 12))
    b = a.clone()
    b[:, 9] = (a[:, 9] + 1) % 64                     # change one token; positions 0..8 come before it
    la, lb = model(a).logits, model(b).logits
    earlier = (la[:, :9] - lb[:, :9]).abs().amax(dim=-1)        # (B, 9)
    if causal:
        # a decoder's past never sees the future (up to float64 rounding: the MoE groups the
        # tokens by expert, so a changed token can change a sum's order)
        assert earlier.max() < 1e-12
    else:
        assert (earlier > 1e-6).all()                # every earlier position sees the change


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_encoder_attention_is_attention_over_every_key(attention):
    """The unmasked bidirectional path equals SDPA with an explicit all-true mask."""
    model = _model(False, attention)
    attn = model.blocks[0].attn
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    cos, sin = model.rope_cos[:10][None, None], model.rope_sin[:10][None, None]
    every_key = torch.ones(2, 1, 10, 10, dtype=torch.bool)
    bidirectional = attn(x, AttentionContext(cos, sin, causal=False))
    explicit = attn(x, AttentionContext(cos, sin, mask=every_key))
    causal = attn(x, AttentionContext(cos, sin))
    torch.testing.assert_close(bidirectional, explicit)
    assert not torch.allclose(bidirectional, causal)


@pytest.mark.parametrize("tied", [True, False])
def test_masked_targets_loss_equals_cross_entropy_on_selected_positions_with_gradients(tied):
    model = moelab.build("bert-moe", SMALL + [f"model.tie_embeddings={str(tied).lower()}"]).double()
    x = torch.randint(0, 64, (3, 16))
    y = torch.full((3, 16), IGNORE_INDEX)
    y[:, 2::5] = torch.randint(0, 64, (3, 3))         # 9 scored positions of 48
    out = model(x, targets=y)
    assert out.logits is None
    out.loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x).logits
    plain = F.cross_entropy(logits.flatten(0, 1), y.flatten())   # ignore_index=-100
    plain.backward()
    torch.testing.assert_close(out.loss, plain)
    manual = F.cross_entropy(logits[:, 2::5].flatten(0, 1), y[:, 2::5].flatten())
    torch.testing.assert_close(out.loss, manual)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, msg=n)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_kv_cache_and_generation_refuse_an_encoder(attention):
    model = _model(False, attention)
    with pytest.raises(ConfigError, match=r"model\.causal = False.*need a causal decoder"):
        model.new_cache(1, 8)
    with pytest.raises(ConfigError, match=r"model\.causal = False"):
        model.generate([[1, 2, 3]], max_new_tokens=2)
