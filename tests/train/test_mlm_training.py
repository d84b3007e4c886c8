"""Masked-LM training end to end on real text: the loss falls, resume is exact, `moelab eval`
reports the masked-token loss and accuracy, generation refuses the encoder."""

import json

import pytest

import moelab
from moelab.cli import main
from moelab.runfolder import checkpoint_dirs, load_metrics
from moelab.train.trainer import train

TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512",
        "model.ffn_hidden=128", "model.moe.expert_hidden=64", "model.moe.num_experts=4",
        "model.max_seq_len=64", "train.batch_size=8", "train.seq_len=64", "train.eval_batches=2",
        "train.log_every=1", "train.warmup_steps=4", "train.lr=0.003",
        "data.max_bytes=1500000", "data.val_fraction=0.1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path_factory.getbasetemp() / "moelab-cache"))


def _cfg(preset, *extra):
    return moelab.resolve_config(preset, TINY + list(extra))


def test_mlm_loss_falls_and_eval_reports_masked_loss_and_accuracy(tmp_path, capsys):
    run = tmp_path / "bert-moe"
    summary = train(_cfg("bert-moe", "train.max_steps=20", "train.eval_every=20"), run,
                    show_progress=False, log=lambda m: None)
    evals = [r["val_loss"] for r in load_metrics(run) if r["kind"] == "eval"]
    # from about ln(512) = 6.24 at step 0
    assert evals[0] > 6.0 and evals[-1] < evals[0] - 0.5, evals
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mlm_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert result["val_loss"] == result["mlm_loss"]
    # the run logged the same masked-token accuracy at its last evaluation (metrics.jsonl)
    last = [r for r in load_metrics(run) if r["kind"] == "eval"][-1]
    assert last["mlm_accuracy"] == pytest.approx(result["mlm_accuracy"])
    assert result["masked_tokens"] == 2 * 8 * 10                  # round(0.15 * 64) per sequence
    # the accuracy is the share of masked positions whose top-1 prediction is the original token
    model = moelab.load(run)
    from moelab.data import eval_batches, prepare_data
    from moelab.runfolder import read_config
    cfg = read_config(run)
    data = prepare_data(cfg.data, cfg.model.vocab_size, log=lambda m: None)
    correct = 0
    for x, y in eval_batches(cfg.train, data):
        picked = y != -100
        correct += int((model(x).logits.argmax(dim=-1)[picked] == y[picked]).sum())
    assert result["mlm_accuracy"] == correct / 160 and correct >= 2     # chance is 1/512
    assert main(["eval", str(run)]) == 0
    assert "masked-token accuracy" in capsys.readouterr().out
    # an encoder has no KV cache: generation stops with the field named, status 2
    assert main(["generate", str(run), "--prompt", "def f(", "--max-new-tokens", "2"]) == 2
    assert "model.causal = False" in capsys.readouterr().err


class _Stop(Exception):
    pass


def test_mlm_stop_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """The masking of step i is drawn from (seed, i): a resumed run sees the same masks."""
    extra = ("train.max_steps=8", "train.save_every=4", "train.eval_every=100")
    train(_cfg("bert", *extra), tmp_path / "full", show_progress=False, log=lambda m: None)

    import moelab.train.trainer as trainer_mod
    real_lr_at = trainer_mod.lr_at

    def stop_at_6(step, progress, cfg):
        if step == 5:          # dies during step 6, after the step-4 checkpoint
            raise _Stop()
        return real_lr_at(step, progress, cfg)

    monkeypatch.setattr(trainer_mod, "lr_at", stop_at_6)
    with pytest.raises(_Stop):
        train(_cfg("bert", *extra), tmp_path / "cut", show_progress=False, log=lambda m: None)
    monkeypatch.setattr(trainer_mod, "lr_at", real_lr_at)
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")][-1] == "ckpt-00000004"
    train(_cfg("bert", *extra), tmp_path / "cut", resume=True, show_progress=False, log=lambda m: None)

    def losses(run):
        return [(r["step"], r["loss"]) for r in load_metrics(run) if r["kind"] == "train"]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")    # exact floats, every step
