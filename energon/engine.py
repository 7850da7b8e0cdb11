"""The Engine: one model served from the user's event loop.

    async with Engine("path/to/checkpoint-or-preset", tp=2, pp=2) as engine:
        done = await engine.infer("The capital of France is", SamplingParams(max_tokens=32))

The Engine is the single controller: it owns the Scheduler and every decision. Workers (one per
device, `energon.runner.ModelRunner`) receive step descriptions in the same order over their
ordered ZeroMQ connections and meet in collectives; the last pipeline stage samples and only
token ids come back. With pp > 1 up to `max_steps_in_flight` micro-batches of disjoint sequences
are in flight: step k+1 is sent without waiting for step k, and each step's future resolves when
its reply arrives, whatever the order.

With `lookahead` on (the default) each micro-batch's next decode step is sent before its last
one returns, its tokens fed on the workers from that step's samples (energon/scheduler.py): at
pp=1 from the step just sampled, at pp > 1 from the tokens the last stage hands straight to the
first (energon/parallel/token_return.py). So the controller's round trip between a micro-batch's
steps is hidden behind the GPUs, and as many micro-batches as stages keep every stage busy
(default: pp). Without lookahead one micro-batch more than stages (default pp + 1) keeps the
first stage busy while a finished micro-batch's reply travels back and the controller schedules
it again (on 2 H100s, opt-13b, pp=2: 2,921 tokens/s with 3 in flight, 2,591 with 2, 2,622 with
4; `energon bench pipeline --more-in-flight`); each micro-batch more reads every stage's
weights once more a round.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import numbers
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from energon.actors import ActorGroup
from energon.actors.transport import free_port
from energon.errors import CheckpointError, EnergonError, InvalidRequest, RemoteError, WorkerFailed
from energon.launchers import check_launcher, start_remote_workers
from energon.models.registry import context_window, num_layers, resolve
from energon.parallel.pipeline import cut_stages
from energon.parallel.topology import NO_MULTICAST_ENV
from energon.recovery import Recovery
from energon.request import Request
from energon.sampling import (
    MAX_LOGPROBS,
    Completion,
    SamplingParams,
    StreamPiece,
    TokenLogprob,
)
from energon.scheduler import Scheduler, StepPlan, fraction
from energon.sequence import Sequence as SchedSequence
from energon.startup import StartupProgress, engine_tokenizer
from energon.step import step_message
from energon.tokenizer import require_unicode

log = logging.getLogger("energon")

# a step of at most this many sampled rows hands its tokens over before the next kick while
# another step is in flight (Engine._apply_step)
TOKENS_FIRST_ROWS = 8
PREFIX_WAIT_ENV = "ENERGON_PREFIX_WAIT"  # "0": requests never wait for an in-flight prefix

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(field: str, value: int | str | None) -> int | None:
    """'2GiB' / '512MB' / 1 << 30 -> bytes; None stays None. Raises InvalidRequest(field)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number) :]
        try:
            if unit in _UNITS and float(number) > 0:
                return int(float(number) * _UNITS[unit])
        except ValueError:
            pass
    raise InvalidRequest(
        field, f"must be a positive byte count like 2147483648 or '2GiB' (got {value!r})"
    )


def _positive(field: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidRequest(field, f"must be an int >= {low} (got {value!r})")
    return value


def _seconds(field: str, value) -> float:
    """A positive, finite number of seconds; InvalidRequest naming `field` otherwise."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidRequest(field, f"must be a positive number of seconds (got {value!r})")
    return float(value)


def _splits(value, pp: int) -> list[int] | None:
    """stage_splits as a list of pp layer counts >= 1 (their sum is checked against the model
    at start); None stays None."""
    if value is None:
        return None
    if (
        isinstance(value, str | bytes)
        or not isinstance(value, Sequence)
        or len(value) != pp
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value)
    ):
        raise InvalidRequest(
            "stage_splits", f"must be {pp} ints >= 1, one layer count per stage (got {value!r})"
        )
    return list(value)


def default_batch_tokens(pp: int) -> int:
    """New tokens a step may take unless the Engine is told: 8,192 on one stage, 4,096 with
    pipeline stages. A prefill step fills and drains the pipeline once over its pp stages, so
    its length is paid about pp - 1 times over at the start and the end of a prefill phase;
    on 4x H200 (opt-13b, 256 prompts of 512 tokens, one call) pp=4 made 8,720 tokens/s with
    4,096 against 8,527 with 8,192, while pp=1 lost ~5 % going below 8,192 in an earlier run
    and gained nothing at 16,384 (2,539 against 2,536; docs/benchmarks.md)."""
    return 8192 if pp == 1 else 4096


def default_in_flight(pp: int, lookahead: bool = True) -> int:
    """Micro-batches in flight unless the Engine is told: one per pipeline stage with lookahead
    (the last stage hands the first each micro-batch's tokens), one more without it."""
    return pp + 1 if pp > 1 and not lookahead else pp


class Engine:
    """Serves one model. Construct, then `await start()` (or `async with`); every public coroutine
    raises `InvalidRequest` for bad arguments before anything is queued.

    A worker that dies does not end the Engine: the requests it was running fail with
    WorkerFailed (or, with `retry_on_failure`, those with no output yet run again, once), and the
    Engine restarts its workers, up to `max_restarts` times in a row, waiting `restart_backoff`
    seconds (doubling) before each; `health` says "degraded" meanwhile. See energon/recovery.py."""

    # What each local worker hosts (a subclass may time it: energon/bench/generate.py).
    worker_actor = "energon.staged_runner:StagedRunner"

    def __init__(
        self,
        model: str,
        *,
        tp: int = 1,
        pp: int = 1,
        device: str = "auto",
        dtype: str = "auto",
        max_num_seqs: int = 256,
        max_batch_tokens: int | None = None,
        max_waiting: int = 4096,
        max_model_len: int | None = None,
        kv_cache_memory: int | str | None = None,
        block_size: int = 16,
        stage_splits: Sequence[int] | None = None,
        max_steps_in_flight: int | None = None,
        launcher: str = "local",
        address: str | None = None,
        seed: int = 0,
        heartbeat_timeout: float = 10.0,
        start_timeout: float = 600.0,
        worker_env: dict[str, str] | None = None,
        progress: bool | None = None,
        pool: str | None = None,
        gpu_memory_budget: int | str | None = None,
        retry_on_failure: bool = False,
        max_restarts: int = 3,
        restart_backoff: float = 1.0,
        decode_graphs: str = "auto",
        lookahead: bool = True,
        kv_reserve: float = 0.0,
        prefix_caching: bool = True,
    ):
        if not isinstance(model, str | os.PathLike) or not str(model):
            raise InvalidRequest(
                "model", f"must be a checkpoint folder or preset name (got {model!r})"
            )
        self.model = str(model)
        self.tp = _positive("tp", tp)
        self.pp = _positive("pp", pp)
        if device not in ("auto", "cpu", "cuda"):
            raise InvalidRequest("device", f"must be 'auto', 'cpu' or 'cuda' (got {device!r})")
        if dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise InvalidRequest(
                "dtype", f"must be 'auto', 'float32', 'float16' or 'bfloat16' (got {dtype!r})"
            )
        # where the workers come from (energon/launchers): "local", "external" or "ray"; address:
        # where the controller listens (tcp://HOST:PORT, HOST an address or interface name)
        check_launcher(launcher, address)
        self.launcher, self.address = launcher, address
        self.device, self.dtype = device, dtype
        if decode_graphs not in ("auto", "off", "static"):
            raise InvalidRequest(
                "decode_graphs", f"must be 'auto', 'off' or 'static' (got {decode_graphs!r})"
            )
        # CUDA graphs of decode steps (energon/decode_graphs.py); "static" runs their
        # static-buffer path without capturing (any device: tests, debugging)
        self.decode_graphs = decode_graphs
        self.max_num_seqs = _positive("max_num_seqs", max_num_seqs)
        self.max_batch_tokens = _positive(
            "max_batch_tokens",
            default_batch_tokens(self.pp) if max_batch_tokens is None else max_batch_tokens,
        )
        self.max_waiting = _positive("max_waiting", max_waiting)
        self.max_model_len = (
            None if max_model_len is None else _positive("max_model_len", max_model_len)
        )
        self.kv_cache_memory = parse_bytes("kv_cache_memory", kv_cache_memory)
        # of the KV blocks running requests would still take to reach max_tokens, kept free when
        # admitting more (energon/scheduler.py): 1.0 never preempts; 0 fills the cache and
        # preempts (recomputes) the newest when it runs out
        self.kv_reserve = fraction("kv_reserve", kv_reserve)
        if prefix_caching not in (True, False):
            raise InvalidRequest(
                "prefix_caching", f"must be True or False (got {prefix_caching!r})"
            )
        # a new request starts from the KV blocks of its longest prefix already computed
        # (energon/block_manager.py)
        self.prefix_caching = prefix_caching
        # and waits for a prefix that a step in flight computes rather than computing it again
        # (energon/scheduler.py); ENERGON_PREFIX_WAIT=0 turns that off, to measure what it gains
        self.prefix_wait = os.environ.get(PREFIX_WAIT_ENV, "1") != "0"
        self.block_size = _positive("block_size", block_size)
        self.stage_splits = _splits(stage_splits, self.pp)
        if lookahead not in (True, False):
            raise InvalidRequest("lookahead", f"must be True or False (got {lookahead!r})")
        self.max_steps_in_flight = _positive(
            "max_steps_in_flight",
            max_steps_in_flight
            if max_steps_in_flight is not None
            else default_in_flight(pp, lookahead),
        )
        # Chained decode steps (the module docstring); at pp=1 for one micro-batch only.
        self.lookahead = lookahead and (pp > 1 or self.max_steps_in_flight == 1)
        self.seed = _positive("seed", seed, low=0)
        self.heartbeat_timeout = _seconds("heartbeat_timeout", heartbeat_timeout)
        self.start_timeout = _seconds("start_timeout", start_timeout)
        self.worker_env = dict(worker_env or {})
        if progress not in (None, True, False):
            raise InvalidRequest(
                "progress", f"must be None (auto), True or False (got {progress!r})"
            )
        self.progress = progress  # a bar on stderr; None: only when stderr is a terminal
        self._init_pool(pool, gpu_memory_budget)  # peer memory pooling (energon/pool)
        self.recovery = Recovery(  # restarts after a worker failure (energon/recovery.py)
            self,
            retry_on_failure=retry_on_failure,
            max_restarts=max_restarts,
            restart_backoff=restart_backoff,
        )

        self.group: ActorGroup | None = None
        self.scheduler: Scheduler | None = None
        self.tokenizer = None
        self.config: dict = {}
        self.vocab_size = 0
        self._requests: dict[int, Request] = {}
        # sequences with a penalty or a logit_bias that ended: the next step says so
        self._released: list[int] = []
        self._ids = itertools.count()
        self._steps: set[asyncio.Task] = set()
        self._failure: EnergonError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closed = False
        self._kick_soon = False  # a _kick is already scheduled for the loop's next turn

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> Engine:
        """Spawns the workers, loads their shards in parallel and sizes the KV cache, showing
        each phase (a bar on a terminal, log lines otherwise). Returns self. Raises
        CheckpointError for an unusable model, the worker's RemoteError if a rank fails to
        build or load (CheckpointError when the checkpoint is the problem), WorkerFailed if a
        worker dies or does not start in `start_timeout` seconds; no worker process is left
        behind then."""
        if self._started:
            return self
        if self._closed:
            raise EnergonError("this Engine was shut down; create a new one")
        t0 = time.perf_counter()
        # Reading config.json and tokenizer.json (megabytes for large vocabularies) is file I/O:
        # a thread does it, so the loop of a server the Engine starts in keeps serving.
        spec = await asyncio.to_thread(resolve, self.model)
        if (layers := num_layers(spec.config)) is not None:  # else the workers' build says why
            cut_stages(layers, self.pp, self.stage_splits)  # pp, stage_splits: before spawning
        self.config = spec.config
        self.vocab_size = int(spec.config["vocab_size"])
        self.tokenizer = await asyncio.to_thread(engine_tokenizer, spec.folder, self.vocab_size)
        world = self.tp * self.pp
        progress = StartupProgress(2 * world + 1, bar=self.progress, start=t0)
        try:
            self.scheduler = self._new_scheduler(await self._bring_up(progress))
        except BaseException as exc:
            progress.fail()
            if self.group is not None:
                await self.group.shutdown()
                self.group = None
            if isinstance(exc, asyncio.TimeoutError):
                raise EnergonError(
                    f"the workers did not finish loading within start_timeout={self.start_timeout}s"
                ) from None
            if isinstance(exc, RemoteError) and exc.remote_type.endswith("CheckpointError"):
                # The checkpoint is unusable: say so with the type users catch, not as a remote bug.
                raise CheckpointError(f"worker {exc.rank}: {exc.message}") from exc
            raise
        self._loop = asyncio.get_running_loop()
        self._started = True
        progress.finish(
            f"ready in {time.perf_counter() - t0:.1f} s: {self.model}, {world} worker(s), "
            f"{self.scheduler.blocks.capacity_tokens} KV-cache tokens"
        )
        return self

    async def _bring_up(self, progress: StartupProgress) -> int:
        """Spawns the workers, loads their shards, borrows pool memory and sizes the KV cache,
        each phase bounded by start_timeout; returns the KV blocks every worker holds. Start-up
        and restarts share it. Raises what the phase raised (asyncio.TimeoutError included)."""
        world = self.tp * self.pp
        progress.phase(
            "spawning workers",
            f"spawning {world} worker(s) for {self.model} "
            f"(tp={self.tp}, pp={self.pp}, device={self.device}, dtype={self.dtype})",
        )
        await self._spawn()
        self.recovery.watch(self.group)
        up = time.perf_counter() - progress.start
        progress.advance(f"{world} worker(s) up in {up:.1f} s", world)
        progress.phase("loading shards", f"loading shards on {world} worker(s) in parallel")
        await asyncio.wait_for(self._load_shards(progress), self.start_timeout)
        await asyncio.wait_for(self._start_pool(), self.start_timeout)
        progress.phase("sizing the KV cache", "sizing the KV cache")
        num_blocks = await asyncio.wait_for(self._start_cache(), self.start_timeout)
        progress.advance(
            f"KV cache of {num_blocks} blocks of {self.block_size} tokens on every worker"
        )
        return num_blocks

    def runner_kwargs(self) -> dict:
        """What every worker's ModelRunner (energon/runner.py) is built with, but init_method."""
        return dict(
            model=self.model,
            tp=self.tp,
            pp=self.pp,
            dtype=self.dtype,
            device=self.device,
            stage_splits=self.stage_splits,
            seed=self.seed,
            pool=self._pool_options(),
            decode_graphs=self.decode_graphs,
            cpu_threads="auto",
            shared_prefixes=self.prefix_caching,  # no shared blocks without it
        )

    async def _spawn(self) -> None:
        runner_kwargs = self.runner_kwargs()
        if self.launcher != "local":  # workers on other hosts, placed by a cluster engine
            self.group = await start_remote_workers(
                self.launcher,
                self.tp,
                self.pp,
                runner_kwargs,
                address=self.address,
                env={**NO_MULTICAST_ENV, **self.worker_env},
                heartbeat_timeout=self.heartbeat_timeout,
                start_timeout=self.start_timeout,
            )
            return
        env = {**NO_MULTICAST_ENV, **self.worker_env}
        self.group = await ActorGroup.spawn(
            self.worker_actor,
            self.tp * self.pp,
            kwargs={**runner_kwargs, "init_method": f"tcp://127.0.0.1:{free_port()}"},
            env=env,
            heartbeat_timeout=self.heartbeat_timeout,
            start_timeout=self.start_timeout,
            address=self.address,
        )

    async def _load_shards(self, progress: StartupProgress) -> None:
        """Every rank loads at once (they meet in the process-group rendezvous); each one's
        report advances the progress as it arrives. Raises the first rank's error."""
        calls = [self.group[rank].call("load") for rank in range(self.group.world_size)]
        try:
            for next_done in asyncio.as_completed(calls):
                r = await next_done
                progress.advance(
                    f"worker {r['rank']} loaded layers {r['layers'][0]}-{r['layers'][1] - 1} "
                    f"({r['tensors']} tensors, {r['bytes'] / 2**20:.1f} MiB) in {r['seconds']:.1f} s"
                )
        finally:
            for call in calls:
                if not call.done():
                    call.cancel()
                elif not call.cancelled():
                    call.exception()  # retrieved: only the first error is raised

    async def _start_cache(self) -> int:
        """Sizes and allocates every worker's KV cache; returns its number of blocks."""
        try:
            fits = await self.group.broadcast(
                "kv_blocks_fit", self.block_size, self.kv_cache_memory
            )
        except RemoteError as exc:
            if exc.remote_type != "ValueError":
                raise
            raise InvalidRequest("kv_cache_memory", exc.message) from exc  # more than fits
        num_blocks = min(fits)
        if num_blocks < 1:
            raise InvalidRequest(
                "kv_cache_memory",
                f"leaves no room for a single KV block of {self.block_size} tokens",
            )
        await self.group.broadcast("init_kv_cache", num_blocks, self.block_size)
        return num_blocks

    def _new_scheduler(self, num_blocks: int) -> Scheduler:
        limit = self.max_model_len or context_window(self.config)
        return Scheduler(
            num_blocks,
            self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_batch_tokens=self.max_batch_tokens,
            max_waiting=self.max_waiting,
            max_model_len=limit,
            micro_batches=self.max_steps_in_flight,
            lookahead=self.lookahead,
            reserve=self.kv_reserve,
            prefix_caching=self.prefix_caching,
            wait_for_prefix=self.prefix_wait,
        )

    async def shutdown(self) -> None:
        """Aborts what is still running (finish_reason 'abort') and stops every worker."""
        if self._closed:
            return
        self._closed = True
        for req in list(self._requests.values()):
            req.abort()
        self._requests.clear()
        for task in list(self._steps):
            task.cancel()
        await self.recovery.stop()
        await self._close_pool()
        if self.group is not None:
            await self.group.shutdown()

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.shutdown()

    # ---------------------------------------------------------------- peer memory pooling
    # Weights that exceed a worker's budget live in memory lent by peer GPUs or pinned host
    # memory (energon/pool); the runner prefetches them layer by layer behind compute.

    def _init_pool(self, pool: str | None, gpu_memory_budget: int | str | None) -> None:
        if pool not in ("auto", "peer", "host", None):
            raise InvalidRequest("pool", f"must be 'auto', 'peer', 'host' or None (got {pool!r})")
        self.pool_mode = pool
        self.gpu_memory_budget = parse_bytes("gpu_memory_budget", gpu_memory_budget)
        if pool is None and gpu_memory_budget is not None:
            raise InvalidRequest("gpu_memory_budget", "needs a pool ('auto', 'peer' or 'host')")
        self.pool = None

    def _pool_options(self) -> dict | None:
        """What each runner needs to decide which layers' weights it pools."""
        if self.pool_mode is None:
            return None
        return {
            "mode": self.pool_mode,
            "budget": self.gpu_memory_budget,
            "reserve": self.kv_cache_memory,
        }

    async def _start_pool(self) -> None:
        if self.pool_mode is not None:
            from energon.pool.allocator import pool_weights

            self.pool = await pool_weights(self.group, self.pool_mode, self.kv_cache_memory)

    async def _close_pool(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            try:
                await asyncio.wait_for(pool.close(), 10.0)
            except (asyncio.TimeoutError, EnergonError) as exc:
                log.warning("energon: returning pooled memory failed: %r", exc)

    # ------------------------------------------------------------------------------ requests

    async def infer(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> Completion:
        """Generates a completion. Raises InvalidRequest / Overloaded at once, WorkerFailed if a
        worker dies. Cancelling the awaiting task aborts the request and frees its blocks."""
        req = self._submit(prompt, params, stream=False)
        async with aclosing(self._pieces(req)) as pieces:
            async for _ in pieces:
                pass
        return req.completion()

    async def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[StreamPiece]:
        """Yields pieces with the text and token ids new since the previous one; the last carries
        finish_reason. Raises like `infer`; closing or cancelling the iteration aborts it."""
        # aclosing: closing this stream closes the inner one now, which drops the request
        async with aclosing(self._pieces(self._submit(prompt, params))) as pieces:
            async for piece in pieces:
                yield piece

    async def _pieces(self, req: Request) -> AsyncIterator[StreamPiece]:
        """A request's pieces up to and including the last; raises what the request failed with.
        However it ends (done, error, cancelled, closed), the request is dropped."""
        try:
            while True:
                piece = await req.pieces.get()
                if isinstance(piece, BaseException):
                    raise piece
                if piece.finish_reason not in (None, "abort") and req.prompt_rows is not None:
                    [rows] = await req.prompt_rows
                    req.prompt_logprobs = piece.prompt_logprobs = [None, *rows]
                yield piece
                if piece.finish_reason is not None:
                    return
        finally:
            if req.prompt_rows is not None:
                req.prompt_rows.cancel()  # no-op once done
            self._drop(req)

    async def forward(self, token_lists: Sequence[Sequence[int]]) -> list:
        """One padding-free pass over variable-length sequences; returns each sequence's float32
        logits [len, vocab] (cpu tensors). Raises InvalidRequest for empty or out-of-range ids;
        while the workers restart it waits for them."""
        lists = await self._pass_input(token_lists)
        logits = await self._pass("forward", lists)
        out, start = [], 0
        for ids in lists:
            out.append(logits[start : start + len(ids)])
            start += len(ids)
        return out

    async def prompt_logprobs(
        self, token_lists: Sequence[Sequence[int]], top: int = 0
    ) -> list[list[TokenLogprob]]:
        """One padding-free pass; per sequence, for each token after the first, its log
        probability given the tokens before it (log_softmax of the raw logits, in float64) and
        the `top` (0 to MAX_LOGPROBS, 20) most likely tokens there: what OpenAI's `echo` with
        `logprobs` shows for a prompt. Raises like `forward`, and InvalidRequest for a sequence
        longer than the context window."""
        if (
            isinstance(top, bool)
            or not isinstance(top, numbers.Integral)
            or not 0 <= top <= MAX_LOGPROBS
        ):
            raise InvalidRequest("top", f"must be an int in [0, {MAX_LOGPROBS}] (got {top!r})")
        lists = await self._pass_input(token_lists)
        limit = self.scheduler.max_model_len
        for ids in lists:
            if limit and len(ids) > limit:
                raise InvalidRequest(
                    "token_lists", f"must hold at most {limit} tokens each (got {len(ids)})"
                )
        rows = await self._pass("prompt_logprobs", lists, int(top))
        return [[TokenLogprob.from_wire(r) for r in seq] for seq in rows]

    async def _pass_input(self, token_lists) -> list[list[int]]:
        """token_lists checked, once the workers are there (they may be restarting)."""
        self._check_running()
        if self.recovery.restarting:
            await self.recovery.wait()
            self._check_running()
        if not isinstance(token_lists, Sequence) or not token_lists:
            raise InvalidRequest("token_lists", "must be a non-empty list of token id lists")
        return [self._check_ids("token_lists", ids) for ids in token_lists]

    async def _pass(self, method: str, *args):
        """A worker call outside the steps; the answer of the rank that replies."""
        # Shielded: a caller that gives up must not cancel the call on some ranks only (the
        # others would wait in a collective forever); the workers finish it either way.
        call = self.group.broadcast(method, *args)
        call.add_done_callback(_retrieve)
        results = await asyncio.shield(call)
        return results[self._reply_rank]

    def stats(self) -> dict:
        """Scheduler and request counters (waiting, running, in-flight steps, KV block use),
        `health` and the recovery counters (restarts, worker failures, failed restarts,
        retried requests)."""
        out = {
            "requests": len(self._requests),
            "steps_in_flight": len(self._steps),
            "health": self.health,
            "restarts": self.recovery.restarts,
            "worker_failures": self.recovery.worker_failures,
            "restart_failures": self.recovery.restart_failures,
            "retried_requests": self.recovery.retried_requests,
        }
        if self.scheduler is not None:
            out.update(vars(self.scheduler.stats()))
        return out

    @property
    def health(self) -> str:
        """The Engine's state: "ok" (serving), "degraded" (restarting failed workers; requests
        queue), "failed" (gave up: every call raises) or "stopped" (not started, shut down)."""
        if self._failure is not None:
            return "failed"
        if not self._started or self._closed:
            return "stopped"
        return "degraded" if self.recovery.restarting else "ok"

    def health_report(self) -> dict:
        """{"status": `health`, "restarts": n} plus "reason" (the failure) when degraded or
        failed: what /health answers."""
        report = {"status": self.health, "restarts": self.recovery.restarts}
        reason = self._failure or (self.recovery.failure if self.recovery.restarting else None)
        if reason is not None:
            report["reason"] = str(reason)
        return report

    # ------------------------------------------------------------------------------ internals

    def _check_running(self) -> None:
        if self._failure is not None:
            raise self._failure
        if not self._started or self._closed:
            raise EnergonError(
                "the Engine is not running: use `await engine.start()` or `async with Engine(...)`"
            )
        if asyncio.get_running_loop() is not self._loop:
            raise EnergonError(
                "the Engine serves only the event loop it was started in; call it from there "
                "(from another thread: asyncio.run_coroutine_threadsafe(..., that_loop))"
            )

    def _check_ids(self, field: str, ids) -> list[int]:
        """`ids` as a list of Python ints (numpy integers accepted); raises InvalidRequest(field)
        unless it is a non-empty sequence of ids in [0, vocab_size)."""
        if isinstance(ids, str | bytes) or not isinstance(ids, Sequence) or not len(ids):
            raise InvalidRequest(field, "must be a non-empty list of token ids")
        if all(type(t) is int for t in ids) and 0 <= min(ids) and max(ids) < self.vocab_size:
            return list(ids)  # the common case, checked at C speed
        for t in ids:
            if (
                isinstance(t, bool)
                or not isinstance(t, numbers.Integral)
                or not 0 <= t < self.vocab_size
            ):
                raise InvalidRequest(
                    field, f"must hold token ids in [0, {self.vocab_size}) (got {t!r})"
                )
        return [int(t) for t in ids]

    def _submit(self, prompt, params: SamplingParams | None, stream: bool = True) -> Request:
        self._check_running()
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(
                "params", f"must be a SamplingParams (got {type(params).__name__})"
            )
        params.validate(vocab_size=self.vocab_size)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "must not be empty")
            ids = self._check_ids("prompt", self.tokenizer.encode(require_unicode(prompt)))
        else:
            ids = self._check_ids("prompt", prompt)
        seq_id = next(self._ids)
        if self._kick_soon and self.scheduler.waiting_full:
            self._kick_now()  # a full queue: admit what can run now before refusing anyone
        self.scheduler.add(SchedSequence(seq_id, ids, params.max_tokens))  # may raise
        req = Request(seq_id, ids, params, self.tokenizer, stream)
        if params.prompt_logprobs is not None:  # one pass beside the batch, awaited at the end
            req.prompt_rows = asyncio.ensure_future(
                self.prompt_logprobs([ids], params.prompt_logprobs)
            )
            req.prompt_rows.add_done_callback(_retrieve)
        self._requests[seq_id] = req
        self._kick_next_turn()
        return req

    def _kick_next_turn(self) -> None:
        """`_kick` once the loop has run what is already ready: requests submitted in the same
        turn (a burst through asyncio.gather) then share the first step, where a kick per
        request sent the first one alone (and, with lookahead, its next step too) while the
        rest waited for those to come back."""
        if not self._kick_soon:
            self._kick_soon = True
            asyncio.get_running_loop().call_soon(self._kick_now)

    def _kick_now(self) -> None:
        self._kick_soon = False
        self._kick()

    def _drop(self, req: Request) -> None:
        """Forget a request; if it was still running, abort it in the scheduler."""
        if self._requests.pop(req.seq_id, None) is not None and self.scheduler is not None:
            if "seq" in req.wire_params:  # the sampling rank drops what it keeps for it
                self._released.append(req.seq_id)
            self.recovery.forget(req.seq_id)
            self.scheduler.abort(req.seq_id)
            if not req.done:
                req.abort()
            self._kick()

    def _kick(self) -> None:
        """Send as many steps as may be in flight. Never blocks: each step is sent now, in the
        order planned (so every worker receives steps in that order), and awaited by a task."""
        while (
            len(self._steps) < self.max_steps_in_flight * (1 + self.lookahead)
            and self._failure is None
            and not self._closed
            and not self.recovery.restarting
        ):
            plan = self.scheduler.schedule()
            if plan is None:
                return
            for s in plan.seqs:
                req = self._requests.get(s.seq_id)
                if req is not None:
                    req.on_scheduled(s.start)
            try:
                oldest = self.scheduler.oldest_in_flight if self.lookahead else None
                message = step_message(plan, self._requests, oldest, self._released)
                replies = self.group.broadcast("sample_step", message)
                self._released = []
            except Exception as exc:  # the step could not be encoded or sent
                self._fail_step(plan, exc)
                continue
            task = asyncio.ensure_future(self._run_step(plan, replies, self.group))
            self._steps.add(task)
            task.add_done_callback(self._steps.discard)

    @property
    def _reply_rank(self) -> int:
        """The rank that answers steps and forwards: the last stage's tp rank 0."""
        return (self.pp - 1) * self.tp

    async def _run_step(self, plan: StepPlan, replies: asyncio.Future, group: ActorGroup) -> None:
        """Waits for one step's replies (the last stage answers last) and applies them."""
        try:
            results = await replies
        except asyncio.CancelledError:
            raise  # only shutdown and restarts cancel steps
        except BaseException as exc:  # a worker died or the step raised on some rank
            failure = await self._name_dead_peer(exc, group)
            if group is self.group and not self.recovery.restarting:
                self._fail_step(plan, failure)
        else:
            # This step no longer occupies a slot (on the other paths: finally, below), so that
            # _apply_step can send the next ones.
            self._steps.discard(asyncio.current_task())
            self.recovery.served()
            self._apply_step(plan, results[self._reply_rank])
        finally:
            self._steps.discard(asyncio.current_task())
        self._kick()
        self._drop_returns()

    def _drop_returns(self) -> None:
        """With the hand-back (pp > 1, lookahead) the first stage posts a step's token receive
        only when a later step chains it (energon/parallel/token_return.py). Once nothing is in
        flight no step sent so far will be chained, so the workers drop those tokens, posting the
        receives no step asked for: each send on the last stage then meets its receive while
        the Engine idles. (On NCCL such small sends were seen to complete without it, 2x H200;
        a send that waited would meet the process group's timeout.)"""
        if not self.lookahead or self.pp == 1 or self._steps or self.group is None:
            return  # called as each step ends: nothing in flight once, as the Engine goes idle
        if self.recovery.restarting or self._closed:
            return
        try:
            sent = self.group.broadcast("drop_returns", self.scheduler.next_step_id)
            sent.add_done_callback(_retrieve)
        except Exception as exc:  # the group is failing: its steps report that
            log.debug("energon: could not send drop_returns: %r", exc)

    async def _name_dead_peer(self, exc: BaseException, group: ActorGroup) -> BaseException:
        """A rank whose peer died fails its collective (gloo: "connection reset") and may
        answer before the dead process is noticed (a local one within milliseconds, by its
        sentinel). With several workers, a step error waits a moment for the liveness monitor
        to name a dead worker, so that requests fail with WorkerFailed, which says which."""
        if isinstance(exc, WorkerFailed) or self.tp * self.pp == 1:
            return exc
        try:
            return await asyncio.wait_for(
                group.wait_failed(), timeout=min(_PEER_FAILURE_GRACE, self.heartbeat_timeout)
            )
        except TimeoutError:
            return exc  # every worker is alive: the step itself raised

    def _apply_step(self, plan: StepPlan, reply: dict) -> None:
        """Hand each sampled token to its request; finish the sequences that are done.

        The next steps go out as soon as the scheduler knows the tokens and the sequences that
        end by count or stop token (cheap), before the requests detokenize and stream theirs:
        with pipeline stages that work is otherwise a gap on every stage. A sequence that
        turns out to end on a stop string is finished after that; a step already sent with it
        computes one token that is ignored, as with lookahead.

        Except when another step is still in flight (lookahead: the device has it queued) and
        this one sampled at most TOKENS_FIRST_ROWS rows: then the few detokenizations cost the
        workers nothing, and the tokens reach their requests before the kick (0.4 ms on an
        H200 host, docs/benchmarks.md "First token, taken apart") instead of after it."""
        sampled_ids = [s.seq_id for s in plan.seqs if s.sample]
        tokens = dict(zip(sampled_ids, reply["token_ids"], strict=True))
        logprobs = dict(zip(sampled_ids, reply.get("logprobs") or [], strict=False))
        taken = []  # (seq_id, its live request, its token, finished already)
        for seq in self.scheduler.complete(plan, tokens):
            seq_id, token = seq.seq_id, tokens[seq.seq_id]
            req = self._requests.get(seq_id)
            ended = req is None or req.ends_with(token)
            if ended:
                self.scheduler.finish(seq_id)
            if req is not None:
                taken.append((seq_id, req, token, ended))
        tokens_first = bool(self._steps) and len(taken) <= TOKENS_FIRST_ROWS
        if not tokens_first:
            self._kick()
        for seq_id, req, token, ended in taken:
            try:
                done = req.on_token(token, logprobs.get(seq_id))
            except Exception as exc:  # e.g. the tokenizer cannot decode the token
                req.abort(EnergonError(f"request failed while decoding its output: {exc!r}"))
                done = True
            if done and not ended:
                self.scheduler.finish(seq_id)
        if tokens_first:
            self._kick()

    def _fail_step(self, plan: StepPlan, exc: BaseException) -> None:
        """A step did not come back. If a worker died, the group is replaced (recovery decides
        what becomes of its requests). Otherwise the step raised: its requests fail with the
        error, and with more than one worker (the others may now wait in a collective that
        never completes) the group is replaced too."""
        if isinstance(exc, WorkerFailed):
            self._on_worker_failed(exc)
            return
        error = exc if isinstance(exc, EnergonError) else EnergonError(f"step failed: {exc!r}")
        for s in plan.seqs:
            self.scheduler.abort(s.seq_id)
            req = self._requests.get(s.seq_id)
            if req is not None:
                req.abort(error)
        if any(p is plan for p in self.scheduler.in_flight):
            self.scheduler.complete(plan, {})
        if self.tp * self.pp > 1:
            self._on_worker_failed(
                EnergonError(f"a step failed on the workers, which may now be out of step: {error}")
            )

    def _on_worker_failed(self, exc: EnergonError) -> None:
        """The worker group failed: recovery fails or puts back its requests and restarts it,
        or, out of restarts, fails the Engine for good."""
        self.recovery.on_failure(exc)

    def _fail_for_good(self, exc: EnergonError) -> None:
        """The Engine cannot go on: every request fails with `exc`, and so does every call."""
        if self._failure is not None or self._closed:
            return
        self._failure = exc
        log.error("energon: %s; failing every request", exc)
        for req in list(self._requests.values()):
            req.abort(exc)


_PEER_FAILURE_GRACE = 1.0  # seconds a failed step waits for a dead peer to be named


def _retrieve(fut: asyncio.Future) -> None:
    """Marks a future's exception as seen (its caller may have stopped waiting)."""
    if not fut.cancelled():
        fut.exception()
