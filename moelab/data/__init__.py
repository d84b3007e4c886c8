"""Data: the built-in corpus, user corpora, the BPE tokenizer, cached token streams, batches.

    prepare_data(cfg.data, cfg.model.vocab_size)  ->  PreparedData(train_tokens, val_tokens, ...)
    TokenBatches(prep.train_tokens, B, T, seed).batch(step)  ->  (x, y)
    val_batches(prep.val_tokens, B, T, n)  ->  [(x, y), ...]
    objective_batches(cfg.train, prep)  ->  (train batches, val batches) for train.objective

Modules, one concern each: ``stdlib`` (find the built-in corpus), ``corpus`` (read, fingerprint
and split documents), ``tokenizer`` (train / load / cache BPE), ``tokens`` (encode and cache
memmaps), ``batches`` (windows), ``mlm`` (BERT's masking), ``objective`` (the batches of
``train.objective``), ``cache`` (atomic files), ``prepare`` (the pipeline).
"""

from moelab.data.batches import TokenBatches, val_batches
from moelab.data.cache import default_cache_dir
from moelab.data.corpus import CorpusInfo, Document, is_val_path, load_corpus, split_documents
from moelab.data.errors import DataError
from moelab.data.mlm import MaskedBatches, Masking, mask_tokens
from moelab.data.objective import eval_batches, objective_batches, train_batches
from moelab.data.prepare import PreparedData, prepare_data
from moelab.data.tokenizer import EOS_TOKEN, MASK_TOKEN

__all__ = [
    "CorpusInfo",
    "DataError",
    "Document",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "MaskedBatches",
    "Masking",
    "PreparedData",
    "TokenBatches",
    "default_cache_dir",
    "eval_batches",
    "is_val_path",
    "load_corpus",
    "mask_tokens",
    "objective_batches",
    "prepare_data",
    "split_documents",
    "train_batches",
    "val_batches",
]
