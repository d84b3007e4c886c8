"""llama.cpp's tokenizer, read from the GGUF metadata, gives the same ids as Hugging Face
``tokenizers`` on 1,000 lines of the built-in corpus, for each pre-tokenizer the exporter maps:
moelab's own byte-level BPE (llama.cpp "gpt-2"), and BPEs trained with the Llama 3 and Qwen2
split regexes ("llama-bpe", "qwen2")."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

import moelab  # noqa: E402
from moelab.config import DataConfig  # noqa: E402
from moelab.data.corpus import load_corpus  # noqa: E402
from moelab.data.tokenizer import EOS_TOKEN, MASK_TOKEN, train_bpe  # noqa: E402
from moelab.interop.gguf import export_gguf  # noqa: E402
from moelab.interop.gguf_arch import GGUFRefusal  # noqa: E402
from moelab.interop.gguf_vocab import LLAMA3_REGEX, QWEN2_REGEX  # noqa: E402

LINES = 1000


@pytest.fixture(scope="module")
def corpus():
    """The first ~1.5 MB of the built-in corpus: texts to train on, and 1,000 lines spread over it
    (newlines kept: indentation and line ends are where pre-tokenizers differ)."""
    docs, _ = load_corpus(DataConfig(max_bytes=1_500_000))
    lines = [line for d in docs for line in d.text.splitlines(keepends=True) if line.strip()]
    step = len(lines) // LINES
    return [d.text for d in docs], lines[::step][:LINES]


def _split_bpe(texts, regex: str, ignore_merges: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=[EOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def _detokenize(llm, ids: list[int]) -> bytes:
    """llama.cpp's pieces, concatenated (llama-cpp-python's ``detokenize`` uses a 32-byte buffer
    and cuts longer pieces, such as a newline plus 40 spaces of indentation)."""
    import ctypes
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    buf = ctypes.create_string_buffer(256)
    out = []
    for t in ids:
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, 256, 0, False)
        out.append(buf.raw[:n])
    return b"".join(out)


def _same_ids(tok: Tokenizer, lines: list[str], tmp_path, pre: str):
    vocab = tok.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    model = moelab.build("dense", [f"model.vocab_size={vocab}", "model.d_model=32", "model.n_layers=1",
                                   "model.n_heads=2", "model.ffn_hidden=32"])
    path = export_gguf(model, tmp_path / "tok.gguf", type="f32", tokenizer_json=tok.to_str()).path
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == pre
        differ = [line for line in lines
                  if llm.tokenize(line.encode("utf-8"), add_bos=False, special=False) != tok.encode(line).ids]
        joined = "".join(lines)
        assert _detokenize(llm, tok.encode(joined).ids) == joined.encode("utf-8")
    finally:
        llm.close()
    assert not differ, f"{len(differ)} of {len(lines)} lines tokenize differently, e.g. {differ[:3]}"


def test_moelab_bpe_matches_llama_cpp_gpt2(corpus, tmp_path):
    texts, lines = corpus
    assert len(lines) == LINES
    _same_ids(train_bpe(texts, 2048), lines, tmp_path, "gpt-2")


@pytest.mark.parametrize("regex,ignore_merges,pre", [(LLAMA3_REGEX, True, "llama-bpe"), (QWEN2_REGEX, False, "qwen2")],
                         ids=["llama-bpe", "qwen2"])
def test_split_regex_bpes_match_llama_cpp(corpus, tmp_path, regex, ignore_merges, pre):
    texts, lines = corpus
    _same_ids(_split_bpe(texts, regex, ignore_merges), lines, tmp_path, pre)


def test_unmapped_tokenizers_are_refused(corpus, tmp_path):
    texts, _ = corpus
    tok = train_bpe(texts[:5], 300)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    model = moelab.build("dense", ["model.vocab_size=300", "model.d_model=32", "model.n_layers=1", "model.n_heads=2"])
    with pytest.raises(GGUFRefusal, match="tokenizer.json pre_tokenizer"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_json=tok.to_str())
    tok = _split_bpe(texts[:5], r"\s+|\w+", False)
    with pytest.raises(GGUFRefusal, match="no llama.cpp pre-tokenizer"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_json=tok.to_str())
    assert not list(tmp_path.iterdir())
