"""The offline Python API, in vLLM's conventions:

    from kcache_dist import LLM, SamplingParams
    llm = LLM()                                   # the embedded default model
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Optional, Sequence, Union

import numpy as np

from .config import EngineConfig, KCacheConfig, kind_of
from .engine.llm_engine import LLMEngine, Prompt
from .outputs import RequestOutput
from .parallel import ReplicaProgress, dp_gather_objects, rank_was_lost
from .sampling_params import RequestOutputKind, SamplingParams

Message = dict[str, str]


class LLM:
    """An engine for offline batches.

    LLM(model=None, dtype=None, kcache=KCacheConfig(...), tensor_parallel_size=None, config=None, **kwargs):
    `kwargs` are `EngineConfig` fields; `config` names a ds_configs JSON file whose values the
    keyword arguments override; an argument left at None keeps the file's (or the default) value.
    """

    def __init__(self, model: Optional[str] = None, dtype: Optional[str] = None, kcache: Optional[KCacheConfig] = None,
                 tensor_parallel_size: Optional[int] = None, config: Optional[str] = None, **kwargs: Any):
        base = EngineConfig.from_json(config) if config is not None else EngineConfig()
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ValueError(f"unknown LLM argument(s) {', '.join(unknown)}; allowed: model, dtype, kcache, "
                             f"tensor_parallel_size, config, {', '.join(sorted(fields - {'model', 'dtype', 'kcache'}))}")
        overrides = dict(kwargs)
        if model is not None:
            overrides["model"] = model
        if dtype is not None:
            overrides["dtype"] = dtype
        if kcache is not None:
            overrides["kcache"] = kcache
        if tensor_parallel_size is not None:
            overrides["parallel"] = dataclasses.replace(overrides.get("parallel", base.parallel),
                                                        tensor_parallel_size=tensor_parallel_size)
        self.engine = LLMEngine(dataclasses.replace(base, **overrides))
        self.config = self.engine.config  # as run: defaults that depend on the device made definite

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[RequestOutput]:
        """Run every prompt (a string, a list of token ids, or vLLM's prompt dicts {"prompt": text} and
        {"prompt_token_ids": ids}) to completion; outputs in input order. Token ids may be numpy's
        integers, and a 1-D numpy array of them is one prompt (a 2-D one a batch of prompts).

        In a launched job, call it on every rank with the same arguments: the prompts are shared
        out over the data-parallel replicas and every output comes back on global rank 0 (the
        other ranks return an empty list)."""
        if isinstance(prompts, (str, dict)) or _is_one_token_prompt(prompts):
            prompts = [prompts]
        prompts = [_plain_prompt(p) for p in prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        # every rank validates every prompt before any is queued
        validated = [self.engine.validate(p, sp) for p, sp in zip(prompts, params)]
        params = [dataclasses.replace(sp, output_kind=RequestOutputKind.FINAL_ONLY) for sp in params]  # one output each
        engine, state = self.engine, self.engine.parallel
        mine = [i for i in range(len(prompts)) if i % state.dp_size == state.dp_rank]  # this replica's share
        results: dict[int, RequestOutput] = {}
        if engine.is_scheduler:
            request_ids: dict[str, int] = {}
            progress = ReplicaProgress()  # the replicas finish when they finish
            try:
                for i in mine:
                    request_ids[engine.add_validated_request(*validated[i], params[i])] = i
                    engine.keepalive()  # the workers already wait for the first plan
                    progress.beat()
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished and out.request_id in request_ids:
                            results[request_ids[out.request_id]] = out
                    progress.beat()
            except BaseException:  # e.g. KeyboardInterrupt: leave the engine as it was, for the next call
                for request_id in request_ids:
                    engine.abort_request(request_id)
                raise
            finally:
                if not rank_was_lost():
                    engine.stop_workers()
        else:
            engine.run_worker()
        if state.dp_size == 1:
            return [results[i] for i in range(len(prompts))] if state.rank == 0 else []
        if engine.is_scheduler:  # the gather below waits at most the collective timeout
            progress.done()
            progress.wait_for_all()
        gathered = dp_gather_objects(results)
        if gathered is None:
            return []
        merged = {i: out for part in gathered for i, out in part.items()}
        return [merged[i] for i in range(len(prompts))]

    def chat(self, messages: Union[list[Message], list[list[Message]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
                   for conv in conversations]
        token_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(token_ids, sampling_params)
        for out, text in zip(outputs, prompts):
            out.prompt = text
        return outputs


def _is_one_token_prompt(prompts) -> bool:
    """Whether `generate`'s `prompts` is one prompt of token ids rather than a batch: a numpy array
    of at most one dimension, or a list or tuple whose first item is a number (a float or a bool
    there is a bad token id, which the engine's validation names, not a prompt of its own)."""
    if isinstance(prompts, np.ndarray):
        return prompts.ndim <= 1  # a 0-d array goes to the engine's check as one (bad) prompt
    return isinstance(prompts, (list, tuple)) and len(prompts) > 0 and isinstance(prompts[0],
                                                                                   (numbers.Number, np.bool_))


def _plain_prompt(prompt):
    """A prompt as the engine takes it: vLLM's TextPrompt / TokensPrompt dicts unwrapped."""
    if not isinstance(prompt, dict):
        return prompt
    if set(prompt) == {"prompt_token_ids"}:
        token_ids = prompt["prompt_token_ids"]
        # (a string here is no text prompt)
        if not isinstance(token_ids, (list, tuple, np.ndarray)) or getattr(token_ids, "ndim", 1) != 1:
            raise ValueError(f"'prompt_token_ids' must be a list of token ids, got {kind_of(token_ids)}")
        return list(token_ids) if isinstance(token_ids, tuple) else token_ids  # the engine checks the ids
    if set(prompt) == {"prompt"}:
        return prompt["prompt"]
    raise ValueError(f"a prompt dict holds either 'prompt' (text) or 'prompt_token_ids', got keys {sorted(prompt)}")
