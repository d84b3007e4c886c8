"""train.compile degrades to eager, with a warning, wherever torch.compile cannot work."""

import torch

from moelab.config import model_config
from moelab.model.transformer import Transformer
from moelab.train import compile as compile_mod


def _tiny():
    torch.manual_seed(0)
    return Transformer(model_config(n_layers=1, d_model=32, n_heads=2, vocab_size=64, max_seq_len=16,
                                    moe={"num_experts": 2, "expert_hidden": 16}))


def test_broken_compiler_trains_eagerly(monkeypatch):
    def broken(fn, **_):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    warnings = []
    model = _tiny()
    assert compile_mod.compile_dense_parts(model, warnings.append) == 0
    assert warnings and "training eagerly" in warnings[0]
    assert "forward" not in vars(model.blocks[0].attn)          # left untouched


def test_module_whose_first_compiled_call_fails_runs_eagerly(monkeypatch):
    model, reference = _tiny(), _tiny()
    monkeypatch.setattr(compile_mod, "_probe", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda fn, **_: (lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x"))))
    warnings = []
    assert compile_mod.compile_dense_parts(model, warnings.append) > 0
    tokens = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits, rtol=0, atol=0)
    assert any("running it eagerly" in w for w in warnings)
