"""Sampling: seeded runs repeat whatever shares the batch; filters keep what they should; stop
strings, stop token ids, EOS and max_tokens end requests exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS
from helpers import token_ids
from kcache_dist import LLM, SamplingParams
from kcache_dist.engine.detokenizer import IncrementalDetokenizer, find_stop
from kcache_dist.engine.sampler import filter_logits, sample


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(device="cpu", model=tiny_llama_dir)


def test_seeded_sampling_is_reproducible_across_batches(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24)
    alone = llm.generate(PROMPTS[1], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=24)] * 3  # unseeded neighbours
    batched = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]], [others[0], params, others[1], others[2]])
    assert batched[1].outputs[0].token_ids == alone
    other_seed = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_tokens=24))
    assert other_seed[0].outputs[0].token_ids != alone
    greedy = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=24))
    assert greedy[0].outputs[0].token_ids != alone  # temperature 1 really samples


def test_engine_seed_makes_unseeded_runs_repeat(tiny_llama_dir):
    params = SamplingParams(temperature=1.0, max_tokens=16)
    first = token_ids(LLM(device="cpu", model=tiny_llama_dir, seed=7).generate(PROMPTS, params))
    again = token_ids(LLM(device="cpu", model=tiny_llama_dir, seed=7).generate(PROMPTS, params))
    assert first == again


def test_top_k_one_is_greedy(llm):
    greedy = token_ids(llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16)))
    top1 = token_ids(llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=16)))
    assert top1 == greedy


def test_filter_logits_top_k_and_top_p():
    logits = torch.randn(50)
    order = logits.argsort(descending=True)
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_k=5)))
    assert kept.sum() == 5 and kept[order[:5]].all()
    probs = (logits / 0.7).softmax(-1)
    top_p = 0.6
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=0.7, top_p=top_p)))
    # the smallest set of most likely tokens whose mass reaches top_p
    mass = probs[order].cumsum(0)
    expected = int((mass < top_p).sum()) + 1
    assert kept.sum() == expected and kept[order[:expected]].all()
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=1e-9))).sum() == 1
    tied = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0])
    assert torch.isfinite(filter_logits(tied, SamplingParams(top_k=2))).sum() == 2  # ties do not widen top-k


def test_tiny_temperatures_are_greedy():
    logits = torch.randn(4, 50) * 10
    params = [SamplingParams(temperature=t, seed=i) for i, t in enumerate((5e-324, 1e-45, 1e-38, 9e-6))]
    assert all(p.greedy for p in params) and not SamplingParams(temperature=1e-4).greedy
    tokens = sample(logits, params, [None] * 4, torch.Generator().manual_seed(0))
    assert tokens == logits.argmax(-1).tolist()


def test_the_device_wait_runs_once_before_any_token_is_read_back():
    """The engine's wait with a deadline (tensor parallelism on CUDA) comes after the argmax is
    queued, once, and an error from it (a lost rank) reaches the caller with no token taken."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)]
    calls = []
    tokens = sample(logits, params, [None, None], torch.Generator().manual_seed(0), lambda: calls.append(1))
    assert calls == [1] and tokens[0] == 1 and tokens[1] in (0, 1, 2)

    def lost():
        raise RuntimeError("lost rank")
    with pytest.raises(RuntimeError, match="^lost rank$"):
        sample(logits, params, [None, None], torch.Generator().manual_seed(0), lost)


def test_filter_logits_scales_after_subtracting_the_max():
    logits = torch.tensor([3e38, -3e38, 0.0])  # divided first by 0.5, the max would overflow to inf (NaN after)
    assert filter_logits(logits, SamplingParams(temperature=0.5)).softmax(-1).tolist() == [1.0, 0.0, 0.0]


def test_stop_string_cuts_exactly(llm):
    base = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and stop in text
    cut = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=32, stop=[stop, "\u2603never"]))[0]
    out = cut.outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == base.token_ids[: len(out.token_ids)] and len(out.token_ids) < len(base.token_ids)


def test_stop_token_ids_and_max_tokens(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    target = base.token_ids[5]
    first = base.token_ids.index(target)
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[target]))[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_eos_stops_unless_ignored(tiny_llama_dir):
    llm = LLM(device="cpu", model=tiny_llama_dir)
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    llm.engine.eos_token_ids = {base.token_ids[3]}  # pretend the model's EOS is the 4th greedy token
    first = base.token_ids.index(base.token_ids[3])
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert stopped.token_ids == base.token_ids[: first + 1] and stopped.finish_reason == "stop"
    assert stopped.stop_reason is None  # as vLLM: the EOS is no stop string or stop token id
    ignored = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == base.token_ids


def test_incremental_detokenizer_equals_whole_decode(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    prompt = tok.encode("Words: ")
    text = "naïve café — 東京 🙂 ok\nnext line"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # incomplete characters are held back


def _wordpiece_tokenizer():
    """A WordPiece tokenizer whose decode cleans up spaces before punctuation (no direct backend decode)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[SEP]", "hello", "world", ",", ".", "##s", "it"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                   clean_up_tokenization_spaces=True)


def test_decoder_gives_the_tokenizers_decode(default_model_dir, tokenizer_dir):
    """`decoder_for` (the Rust backend's decode where that is the same) against tokenizer.decode on
    random ids, special tokens included, for BPE tokenizers and a WordPiece one that cleans up."""
    import random

    from transformers import AutoTokenizer

    from kcache_dist.engine.detokenizer import decoder_for

    wordpiece = _wordpiece_tokenizer()
    assert wordpiece.decode([2, 4, 3, 5]) == "hello, world."  # the clean-up this test must keep
    rng = random.Random(0)
    for tok in (AutoTokenizer.from_pretrained(default_model_dir), AutoTokenizer.from_pretrained(tokenizer_dir),
                wordpiece):
        for skip in (True, False):
            decode = decoder_for(tok, skip)
            for _ in range(200):
                ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 12))]
                assert decode(ids) == tok.decode(ids, skip_special_tokens=skip), (type(tok).__name__, ids)


def test_find_stop_spans_and_earliest():
    assert find_stop("hello world", 3, ("wor",)) == (6, "wor")  # completed by the last 3 chars
    assert find_stop("hello world", 1, ("hello",)) is None  # completed earlier: already checked
    assert find_stop("abcXYZ", 3, ("YZ", "cX")) == (2, "cX")
