"""The engine: requests in, a step at a time, outputs out.

Owns the tokenizer, the scheduler and the model runner. `add_request` validates and queues;
`step` runs one scheduled forward, samples, detokenizes and returns outputs as each request's
`output_kind` asks.

Under tensor parallelism the first rank of the group schedules (`is_scheduler`): `step` sends
each plan to the other ranks, which run `run_worker` until `stop_workers`. While the scheduling
rank has no work, `keepalive` tells the workers it is still there (see `keepalive_interval_s`).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import itertools
import logging
import os
import reprlib
import time
import weakref
from typing import Optional, Union

import numpy as np
import torch
from transformers import AutoTokenizer

from ..cache.block_manager import BlockManager
from ..config import EngineConfig, as_int, kind_of
from ..models.model_config import ModelConfig, load_model_config
from ..outputs import CompletionOutput, RequestOutput
from ..parallel import RankLostError, init_parallel, tp_broadcast_object, wait_for_device
from ..sampling_params import RequestOutputKind, SamplingParams
from .detokenizer import IncrementalDetokenizer, find_stop
from .engine_snapshot import EngineSnapshot
from .model_runner import ModelRunner
from .sampler import sample
from .scheduler import Scheduler
from .sequence import Sequence
from .step_plan import KeepAlive, StepPlan

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]

# A worker waits for the next message within the collective timeout; while idle the scheduling rank
# sends one at least every quarter of that timeout (room for a slow wake-up), and at least every
# KEEPALIVE_MAX_INTERVAL_S, since a worker runs its Python signal handlers only between messages.
KEEPALIVE_TIMEOUT_FRACTION = 0.25
KEEPALIVE_MAX_INTERVAL_S = 5.0

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return name


def resolve_dtype(name: str, checkpoint_dtype: Optional[str], device: torch.device) -> torch.dtype:
    """'auto': float32 on CPU; on a GPU the checkpoint's 16-bit dtype, else bfloat16."""
    if name != "auto":
        return _TORCH_DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(checkpoint_dtype or "", torch.bfloat16)


class ContextLengthExceeded(ValueError):
    """A request's prompt plus its max_tokens exceed max_model_len (where that is refused)."""


def resolve_max_model_len(requested: Optional[int], mc: ModelConfig) -> int:
    if requested is not None and requested > mc.max_position_embeddings:
        raise ValueError(f"max_model_len={requested} exceeds the model's max_position_embeddings="
                         f"{mc.max_position_embeddings}")
    max_len = requested or mc.max_position_embeddings
    if mc.sliding_window is not None and max_len > mc.sliding_window:
        raise ValueError(f"max_model_len={max_len} exceeds the model's sliding_window={mc.sliding_window}; "
                         f"sliding-window attention is not supported: set max_model_len <= {mc.sliding_window}")
    return max_len


class LLMEngine:
    def __init__(self, config: EngineConfig):
        """Joins the job's ranks first (layers read their tensor-parallel rank when built)."""
        device_type = resolve_device_type(config.device)
        tp = config.parallel.tensor_parallel_size
        self.parallel = init_parallel(tp, device_type=device_type, timeout_s=config.parallel.collective_timeout_s,
                                      allow_cross_node_tp=config.parallel.allow_cross_node_tp)
        if self.parallel.tp_size != tp:
            raise ValueError(f"tensor_parallel_size={tp} needs a job of a multiple of {tp} processes "
                             "(launched by deepspeed, torchrun or mpirun); this process runs alone")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" \
            else torch.device("cpu")
        if config.model is None:
            from ..default_model import default_model_dir
            model_dir = default_model_dir()
        else:
            model_dir = config.model
            if not os.path.isdir(model_dir):
                raise FileNotFoundError(f"model directory '{model_dir}' does not exist (give a local Hugging Face "
                                        "checkpoint directory, or no model for the embedded default)")
        self.model_dir = model_dir
        self.model_config = load_model_config(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        self.dtype = resolve_dtype(config.dtype, self.model_config.checkpoint_dtype, self.device)
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.model_config)
        kcache = config.kcache.for_device(device_type, self.max_model_len)
        if kcache.mode == "kcache" and config.kcache.row_cache_factor is None and kcache.row_cache_factor:
            logger.info("far-row cache: %g x top_n = %d rows per sequence, sparse layer and KV head (row_cache_factor "
                        "None: the default on %s for max_model_len=%d)", kcache.row_cache_factor,
                        kcache.row_cache_rows, device_type, self.max_model_len)
        config = self.config = dataclasses.replace(config, kcache=kcache)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.runner = ModelRunner(config, model_dir, self.model_config, self.max_model_len, self.device, self.dtype)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, self.runner.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   replay_outputs=config.kcache.mode == "kcache")
        self.generator = torch.Generator().manual_seed(config.seed)
        # micro-batches of decode steps (EngineConfig.decode_micro_batches); the scheduling
        # rank puts it in each plan, so benchmarks may change it between steps
        self.decode_micro_batches = config.decode_micro_batches
        self._seq_ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._by_request: dict[str, Sequence] = {}
        self._last_message_to_workers_s = time.monotonic()
        # Registered after init_parallel's hooks, so it runs before them (atexit is last-in, first-out).
        atexit.register(_release_at_exit, weakref.ref(self))

    def release(self) -> None:
        """Drop the model, cache and tokenizer now. At exit this happens before the process group
        and MPI are shut down: objects that outlived them aborted the process in about one mpirun
        launch in five ("terminate called without an active exception")."""
        if self.runner is not None:
            self.runner.release()
        self.runner = None
        self.tokenizer = None
        gc.collect()

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[Optional[str], list[int]]:
        """(prompt text or None, prompt token ids), validated against the model. Token ids come as a
        list or tuple of integers or a 1-D numpy array of them; numpy's integers count as integers
        and become Python ints. A token id that is not an integer is named with its position."""
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt) if prompt else []
            if not token_ids:
                raise ValueError("prompt is empty: give at least one token")
            return prompt, token_ids
        if isinstance(prompt, np.ndarray) and prompt.ndim == 1:
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {kind_of(prompt)}")
        if len(prompt) == 0:
            raise ValueError("prompt is empty: give at least one token")
        token_ids = [as_int(t) for t in prompt]
        if None in token_ids:
            position = token_ids.index(None)
            value = prompt[position]
            raise ValueError(f"prompt token ids must be integers; got {reprlib.repr(value)} "
                             f"({type(value).__name__}) at position {position}")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        return None, token_ids

    def validate(self, prompt: Prompt, params: SamplingParams,
                 max_tokens_within_context: bool = False) -> tuple[Optional[str], list[int]]:
        """(prompt text or None, token ids) of a request that can run; ValueError saying why not.
        A `max_tokens` past the context ends the output at `max_model_len`, or with
        `max_tokens_within_context` (the server's explicit max_tokens, as vLLM's server) is refused
        with `ContextLengthExceeded`."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self.tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens long but max_model_len is {self.max_model_len} "
                             "(the prompt and at least one generated token must fit)")
        if max_tokens_within_context and len(token_ids) + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"'max_tokens' or 'max_completion_tokens' is too large: {params.max_tokens}. This model's "
                f"maximum context length is {self.max_model_len} tokens and your request has "
                f"{len(token_ids)} input tokens ({params.max_tokens} > {self.max_model_len} - {len(token_ids)})")
        return text, token_ids

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: Optional[str] = None,
                    max_tokens_within_context: bool = False) -> str:
        text, token_ids = self.validate(prompt, params, max_tokens_within_context)
        return self.add_validated_request(text, token_ids, params, request_id)

    def add_validated_request(self, text: Optional[str], token_ids: list[int], params: SamplingParams,
                              request_id: Optional[str] = None) -> str:
        """`add_request` of a prompt that `validate` has passed (its text or None, and its token
        ids), without tokenizing it again."""
        seq_id = next(self._seq_ids)
        request_id = str(seq_id) if request_id is None else request_id
        if request_id in self._by_request:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(seq_id, request_id, text, token_ids, params)
        self._seqs[seq_id] = seq
        self._by_request[request_id] = seq
        self._detokenizers[seq_id] = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request and free its blocks; its final output (finish_reason "abort"; all its text
        and token ids, whatever its output_kind), or None if no such request is running or waiting."""
        seq = self._by_request.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        self._release(seq)
        return self._output(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def is_scheduler(self) -> bool:
        """Whether this rank schedules and samples (the first rank of its tensor-parallel group)."""
        return self.parallel.tp_rank == 0

    def run_worker(self, survive_step_errors: bool = False) -> None:
        """On the other ranks of a tensor-parallel group: run each step plan the scheduling rank
        sends (a `KeepAlive` is a no-op), until it sends None (`stop_workers`).

        A plan whose forward raises ends the loop with that error, unless `survive_step_errors`
        (the server's policy, where the scheduling rank drops the step's requests and serves on):
        then the error is logged and the next plan runs. A lost rank always ends the loop. A
        failure on some ranks only leaves a collective unmatched, which the collective timeout ends
        as a lost rank."""
        while (message := tp_broadcast_object(None)) is not None:
            if not isinstance(message, StepPlan):
                continue
            try:
                self.runner.execute(message)
            except RankLostError:
                raise
            except Exception:
                if not survive_step_errors:
                    raise
                logger.exception("step failed on this rank; the scheduling rank drops its requests, "
                                 "this rank runs the next plan")

    def stop_workers(self) -> None:
        """On the scheduling rank: release the workers from `run_worker`."""
        self._send_to_workers(None)

    @property
    def keepalive_interval_s(self) -> float:
        """Longest time the workers may go without a message from the scheduling rank: a quarter
        of the collective timeout, at most KEEPALIVE_MAX_INTERVAL_S; infinite without workers."""
        if self.parallel.tp_size == 1:
            return float("inf")
        return min(KEEPALIVE_MAX_INTERVAL_S, KEEPALIVE_TIMEOUT_FRACTION * self.config.parallel.collective_timeout_s)

    def keepalive(self) -> bool:
        """On the scheduling rank, between steps (and while it has none to run): send the workers
        a no-op message if they have not heard from it (a plan or a keepalive) for
        `keepalive_interval_s`, so that their wait in `run_worker` never reaches the collective
        timeout. Returns whether a message was sent."""
        if time.monotonic() - self._last_message_to_workers_s < self.keepalive_interval_s:
            return False
        self._send_to_workers(KeepAlive())
        return True

    def _send_to_workers(self, message) -> None:
        if self.parallel.tp_size > 1:
            tp_broadcast_object(message)
            self._last_message_to_workers_s = time.monotonic()

    def snapshot(self) -> EngineSnapshot:
        """Queues and cache occupancy now. Call between steps, on the thread that owns the engine."""
        blocks = self.block_manager
        kv_cache = self.runner.kv_cache
        keeps_v_on_host = bool(getattr(kv_cache, "host_rows", None))  # KCache mode with at least one sparse layer
        return EngineSnapshot(
            kcache_mode=self.config.kcache.mode,
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            num_preemptions_total=self.scheduler.num_preemptions,
            device_cache_blocks_in_use=blocks.num_used_blocks,
            device_cache_blocks_total=blocks.num_blocks,
            host_v_blocks_in_use=blocks.num_used_blocks if keeps_v_on_host else 0,
            host_v_blocks_total=blocks.num_blocks if keeps_v_on_host else 0,
            v_bytes_fetched_total=getattr(kv_cache, "v_rows_fetched", 0) * getattr(kv_cache, "host_row_bytes", 0),
            pinned_host_bytes=self._pinned_host_bytes())

    def _pinned_host_bytes(self) -> int:
        pool = getattr(self.runner.kv_cache, "host_pool", None)
        pool_bytes = pool.num_bytes if pool is not None and pool.pinned else 0
        if self.runner.device.type != "cuda":
            return pool_bytes
        return pool_bytes + int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))

    # ---- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; return the outputs of the requests that got a token in it, as
        their `output_kind` asks (`finished` set on a request's last one)."""
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        plan.micro_batches = self.decode_micro_batches  # the runner splits decode-only steps only
        self._send_to_workers(plan)
        logits = self.runner.execute(plan)
        wait = None
        if self.runner.device.type == "cuda" and self.parallel.tp_size > 1:
            # the all-reduces' kernels wait on a lost peer without a deadline of their own: wait with
            # one, naming a lost peer (the workers wait in the next plan's broadcast, over gloo)
            wait = functools.partial(wait_for_device, self.runner.device, self.config.parallel.collective_timeout_s,
                                     "a step's forward")
        sampled_seqs = [self._seqs[sid] for sid, s in zip(plan.seq_ids, plan.sample) if s]
        tokens = sample(logits, [s.params for s in sampled_seqs], [s.generator for s in sampled_seqs], self.generator,
                        wait)
        for sid, n in zip(plan.seq_ids, plan.num_new_tokens):
            self._seqs[sid].num_computed_tokens += n
        outputs = []
        for seq, token in zip(sampled_seqs, tokens):
            self._append_token(seq, token)
            if seq.finish_reason is not None:
                self._release(seq)
            output = self._step_output(seq)
            if output is not None:
                outputs.append(output)
        return outputs

    def _append_token(self, seq: Sequence, token: int) -> None:
        params = seq.params
        seq.token_ids.append(token)
        detok = self._detokenizers[seq.seq_id]
        delta = detok.add(token)
        seq.output_text += delta
        if params.stop:
            hit = find_stop(seq.output_text, len(delta), params.stop)
            if hit is not None:
                seq.output_text = seq.output_text[:hit[0]]
                seq.finish_reason, seq.stop_reason = "stop", hit[1]
                return
        if token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"  # stop_reason None for the EOS, as vLLM
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.output_text += detok.flush()

    def _release(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        del self._seqs[seq.seq_id]
        del self._detokenizers[seq.seq_id]
        del self._by_request[seq.request_id]

    @classmethod
    def _step_output(cls, seq: Sequence) -> Optional[RequestOutput]:
        """The output of a request that just got a token, by its output_kind; None if it gets none now."""
        kind, finished = seq.params.output_kind, seq.finish_reason is not None
        if kind is RequestOutputKind.DELTA:
            text = seq.streamed_text.next_piece(seq.output_text, finished)
            token_ids = seq.token_ids[seq.num_prompt_tokens + seq.num_output_tokens_sent:]
            seq.num_output_tokens_sent = seq.num_output_tokens
            return cls._output(seq, text, token_ids)
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        return cls._output(seq, seq.streamed_text.shown(seq.output_text, finished))  # as vLLM: no stop start

    @staticmethod
    def _output(seq: Sequence, text: Optional[str] = None, token_ids: Optional[list[int]] = None) -> RequestOutput:
        """The request's output: all its text and token ids so far (a copy: later steps leave it
        as it is), unless given."""
        completion = CompletionOutput(0, seq.output_text if text is None else text,
                                      seq.output_token_ids if token_ids is None else token_ids,
                                      seq.finish_reason, seq.stop_reason)
        return RequestOutput(request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
                             outputs=[completion], finished=seq.finish_reason is not None)


def _release_at_exit(engine_ref: "weakref.ref[LLMEngine]") -> None:
    engine = engine_ref()
    if engine is not None:
        engine.release()
