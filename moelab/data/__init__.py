"""Data: the built-in corpus, user corpora, the BPE tokenizer, cached token streams, batches.

    prepare_data(cfg.data, cfg.model.vocab_size)  ->  PreparedData(train_tokens, val_tokens, ...)
    TokenBatches(prep.train_tokens, B, T, seed).batch(step)  ->  (x, y)
    val_batches(prep.val_tokens, B, T, n)  ->  [(x, y), ...]

Modules, one concern each: ``stdlib`` (find the built-in corpus), ``corpus`` (read, fingerprint
and split documents), ``tokenizer`` (train / load / cache BPE), ``tokens`` (encode and cache
memmaps), ``batches`` (windows), ``cache`` (atomic files), ``prepare`` (the pipeline).
"""

from moelab.data.batches import TokenBatches, val_batches
from moelab.data.cache import default_cache_dir
from moelab.data.corpus import CorpusInfo, Document, is_val_path, load_corpus, split_documents
from moelab.data.errors import DataError
from moelab.data.prepare import PreparedData, prepare_data
from moelab.data.tokenizer import EOS_TOKEN

__all__ = [
    "CorpusInfo",
    "DataError",
    "Document",
    "EOS_TOKEN",
    "PreparedData",
    "TokenBatches",
    "default_cache_dir",
    "is_val_path",
    "load_corpus",
    "prepare_data",
    "split_documents",
    "val_batches",
]
