"""SamplingParams.output_kind: DELTA outputs add up to the CUMULATIVE ones (stop strings cut
included; a CUMULATIVE text never takes back what an earlier one showed), FINAL_ONLY gives the
last CUMULATIVE output alone, CUMULATIVE outputs stay as they were returned, and LLM.generate
gives whole outputs whatever the kind."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from conftest import PROMPTS
from kcache_dist import LLM, RequestOutput, RequestOutputKind, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=32)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(device="cpu", model=tiny_llama_dir)


def run_engine(llm: LLM, params: SamplingParams, kind: RequestOutputKind) -> dict[str, list[RequestOutput]]:
    """Every output `step` returns for PROMPTS submitted together, by request id."""
    engine = llm.engine
    params = dataclasses.replace(params, output_kind=kind)
    outputs = {engine.add_request(p, params, request_id=str(i)): [] for i, p in enumerate(PROMPTS)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


@pytest.fixture(scope="module")
def stop_params(llm) -> SamplingParams:
    """A stop string from the middle of a greedy output, and one that only its first characters start."""
    text = llm.generate(PROMPTS[2], GREEDY)[0].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    return dataclasses.replace(GREEDY, stop=[stop, stop[:2] + "\u2603"])


@pytest.mark.parametrize("with_stop", [False, True])
def test_delta_outputs_add_up_to_the_cumulative_ones(llm, stop_params, with_stop):
    params = stop_params if with_stop else GREEDY
    cumulative = run_engine(llm, params, RequestOutputKind.CUMULATIVE)
    delta = run_engine(llm, params, RequestOutputKind.DELTA)
    if with_stop:
        assert cumulative["2"][-1].outputs[0].stop_reason == params.stop[0]  # the string was cut out
    for request_id, want in cumulative.items():
        cumulative_texts = [o.outputs[0].text for o in want]  # each extends the one before: nothing taken back
        assert all(b.startswith(a) for a, b in zip(cumulative_texts, cumulative_texts[1:])), cumulative_texts
        got = delta[request_id]
        assert len(got) == len(want) and [o.finished for o in got] == [o.finished for o in want]
        assert all(len(o.outputs[0].token_ids) == 1 for o in got)  # one new token a step
        final = want[-1].outputs[0]
        assert [t for o in got for t in o.outputs[0].token_ids] == final.token_ids
        texts = [o.outputs[0].text for o in got]
        assert "".join(texts) == final.text
        assert all(final.text.startswith("".join(texts[:i])) for i in range(len(texts)))  # nothing taken back
        assert [o.outputs[0].finish_reason for o in got] == [None] * (len(got) - 1) + [final.finish_reason]
        assert got[-1].outputs[0].stop_reason == final.stop_reason
        assert got[-1].prompt_token_ids == want[-1].prompt_token_ids


def test_final_only_gives_the_last_cumulative_output(llm, stop_params):
    cumulative = run_engine(llm, stop_params, RequestOutputKind.CUMULATIVE)
    final_only = run_engine(llm, stop_params, RequestOutputKind.FINAL_ONLY)
    assert final_only == {request_id: [outputs[-1]] for request_id, outputs in cumulative.items()}
    assert all(outputs[0].finished for outputs in final_only.values())


def test_cumulative_outputs_stay_as_returned(llm):
    engine, params = llm.engine, dataclasses.replace(GREEDY, ignore_eos=True)
    held = []
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, params, request_id=str(i))
    while engine.has_unfinished_requests():
        held.extend((out, copy.deepcopy(out)) for out in engine.step())
    assert len(held) == len(PROMPTS) * params.max_tokens
    assert all(out == then for out, then in held)  # later steps changed no output already returned


def test_generate_gives_whole_outputs_whatever_the_kind(llm):
    want = [(o.prompt_token_ids, o.outputs, o.finished) for o in llm.generate(PROMPTS, GREEDY)]
    for kind in RequestOutputKind:
        got = llm.generate(PROMPTS, dataclasses.replace(GREEDY, output_kind=kind))
        assert [(o.prompt_token_ids, o.outputs, o.finished) for o in got] == want


def test_abort_gives_all_tokens_whatever_the_kind(llm):
    engine = llm.engine
    for kind in RequestOutputKind:
        engine.add_request(PROMPTS[0], dataclasses.replace(GREEDY, output_kind=kind), request_id="a")
        for _ in range(3):
            engine.step()
        aborted = engine.abort_request("a")
        assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
        assert len(aborted.outputs[0].token_ids) == 3
