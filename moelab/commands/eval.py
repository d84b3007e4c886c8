"""`moelab eval RUN`: validation loss and perplexity of a run folder on its corpus; for a masked
LM (``train.objective = "mlm"``) also the masked-token loss and accuracy."""

from __future__ import annotations

import dataclasses
import json
import math

from moelab.commands import raise_user


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a run")
    p.add_argument("run", help="run folder (or a LoRA adapter folder from moelab finetune)")
    p.add_argument("--base", default=None, metavar="BASE",
                   help="for an adapter folder: its base model, when the path it records has moved")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    p.add_argument("--json", action="store_true",
                   help="print {\"val_loss\", \"perplexity\"} as JSON (a masked LM adds "
                        "\"mlm_loss\" and \"mlm_accuracy\")")
    p.set_defaults(func=run)


def _check_batches_fit(batches: int, split_tokens: int, batch_size: int, seq: int) -> None:
    """--batches may not ask for more windows than the validation split holds without repeating
    itself: the tokens reported would count the same text many times over."""
    fits = max(1, (split_tokens - 1) // (batch_size * seq))
    if batches > fits:
        raise_user(f"--batches = {batches:,} is invalid: the validation split holds {split_tokens:,} "
                   f"tokens, {fits} batch{'es' if fits > 1 else ''} of {batch_size} x {seq} tokens "
                   f"without repeating (--batches {fits} or fewer)")


def run(args) -> int:
    import torch

    from moelab.accounting import inference_bytes
    from moelab.config import MAX_BATCH
    from moelab.data import DataError, eval_batches, prepare_data
    from moelab.resources import available_on, refuse_unless_fits
    from moelab.parallel.layout import pick_device
    from moelab.runfolder import TOKENIZER_FILE, CheckpointError, load, read_config, resolve
    from moelab.train.evaluate import evaluate, evaluate_scores

    if args.batches is not None and not 1 <= args.batches <= MAX_BATCH:
        raise_user(f"--batches = {args.batches} is invalid: must be >= 1 and <= {MAX_BATCH:,}")
    from moelab.adapt.lora import is_adapter_folder, load_adapter_model
    try:
        cfg = read_config(args.run)
    except CheckpointError as e:
        raise_user(str(e))
    t = cfg.train
    seq = min(t.seq_len, cfg.model.max_seq_len)
    device = pick_device(t.device)
    refuse_unless_fits(inference_bytes(cfg.model, 4, t.batch_size, seq), available_on(device),
                       "evaluating this model in float32", str(device), "it does not fit this machine")
    try:
        if is_adapter_folder(args.run):             # base + adapter, merged in memory
            model = load_adapter_model(args.run, base=args.base, dtype=torch.float32)
        elif args.base is not None:
            raise_user(f"--base applies to adapter folders only; {args.run!r} is a run folder")
        else:
            model = load(args.run, dtype=torch.float32)
    except CheckpointError as e:
        raise_user(str(e))
    data_cfg = cfg.data
    tok = resolve(args.run) / TOKENIZER_FILE
    if tok.is_file():   # score with the run's own tokenizer, whatever the config said
        data_cfg = dataclasses.replace(data_cfg, tokenizer=str(tok))
    try:
        data = prepare_data(data_cfg, cfg.model.vocab_size, log=lambda m: None)
        if args.batches is not None:
            _check_batches_fit(args.batches, len(data.val_tokens), t.batch_size, seq)
        batches = eval_batches(t, data, args.batches, seq)     # masked for an MLM run
    except DataError as e:
        raise_user(str(e))
    model.to(device)
    tokens = sum(x.numel() for x, _ in batches)
    if t.objective == "mlm":
        scores = evaluate_scores(model, batches, device)
        loss = scores.loss
        result = {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens,
                  "mlm_loss": loss, "mlm_accuracy": scores.accuracy, "masked_tokens": scores.scored}
    else:
        with torch.no_grad():
            loss = evaluate(model, batches, device)
        result = {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens}
    if args.json:
        print(json.dumps(result))
    elif t.objective == "mlm":
        print(f"masked-LM loss {loss:.4f}  perplexity {result['perplexity']:.2f}  masked-token "
              f"accuracy {scores.accuracy:.4f}  ({scores.scored:,} masked of {tokens:,} tokens)")
    else:
        print(f"val loss {loss:.4f}  perplexity {result['perplexity']:.2f}  ({tokens:,} tokens)")
    return 0
