"""ModelRunner: the actor each worker hosts — its stage of the model, its shards, its KV cache.

A runner joins the process groups, builds the model on the meta device, keeps only its pipeline
stage's modules, materialises those on its device, and loads its slices of the checkpoint (or
random weights for a preset). Then it runs steps: every rank of the group gets the same call in
the same order; stage s receives activations from stage s-1 and sends to s+1; the last stage's
tp rank 0 returns the logits, every other rank returns None.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from energon.actors.deferred import Deferred
from energon.decode_graphs import DEFAULT_BUCKETS as DECODE_BUCKETS
from energon.decode_graphs import DecodeGraphs
from energon.host_copy import to_device
from energon.kernels.gemv import EarlyWeights
from energon.models.llama import rope_parameters
from energon.models.loader import LoadReport, load_weights, random_init
from energon.models.registry import ModelSpec, context_window, resolve
from energon.models.stack import run_layers
from energon.parallel.allreduce import fast_all_reduce
from energon.parallel.attention import Attention
from energon.parallel.one_shot_setup import enable_fast_all_reduce
from energon.parallel.packing import BatchMeta, pack, pad
from energon.parallel.pipeline import cut_stages, recv_activation, send_activation
from energon.parallel.prefix_attention import num_parts
from energon.parallel.shared_prefix import (
    MAX_GROUPS,
    SHARED_PREFIX_ENV,
    SharedPrefixes,
    find_shared_prefixes,
    share_in_parts,
)
from energon.parallel.token_return import TokenReturn
from energon.parallel.topology import ParallelState, Topology, init_parallel, use_parallel
from energon.pool.offload import OffloadMember
from energon.prefill_graphs import DEFAULT_BUCKETS as PREFILL_BUCKETS
from energon.prefill_graphs import PrefillGraphs
from energon.sampler import Sampler, logprob_rows
from energon.sampling import step_features

log = logging.getLogger("energon")

# Decode graphs launch attention for their longest context: at most this many tokens (and no
# more than the KV cache holds); longer decode steps run eagerly.
MAX_GRAPH_CONTEXT = 4096
PROMPT_LOGPROB_ROWS = 256  # positions whose float64 log_softmax prompt_logprobs holds at once
PREFILL_GRAPHS_ENV = "ENERGON_PREFILL_GRAPHS"  # "0": every prefill runs eagerly
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str, config: dict, device: torch.device) -> torch.dtype:
    """ "auto" → the checkpoint's half dtype on cuda, float32 on cpu; raises ValueError if unknown."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        dtype = config.get("torch_dtype") or config.get("dtype") or "float16"
        dtype = dtype if dtype in ("float16", "bfloat16") else "float16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def pick_device(device: str, rank: int) -> torch.device:
    """ "cuda" without an index → this rank's local GPU; "auto" → cuda if present, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    return dev


def worker_threads(device: torch.device, world_size: int) -> int:
    """torch's intra-op CPU threads for one worker: OMP_NUM_THREADS when set; on cuda 1 (the
    host's share of a step is small index tensors, which a pool of threads only slows: on a
    64-core host with four workers a decode step's metadata took 30 ms instead of 0.2 ms); on
    cpu the worker's share of the cores, since the workers compute there side by side.

    Set by the runner itself: torch is imported before a spawned worker's environment is
    applied, so an OMP_NUM_THREADS passed that way alone would not take effect."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    if device.type == "cuda":
        return 1
    return max(1, len(os.sched_getaffinity(0)) // world_size)


def drop_module(model: nn.Module, path: str) -> None:
    parent, _, name = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    owner._modules[name] = None


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter real (uninitialised) storage on `device`; floats in `dtype`.

    Keeps the attributes layers put on parameters (weight_loader, shard_dim, ...) and ties.
    Raises ValueError for a meta buffer: models compute constants lazily or on the cpu.
    """
    fresh: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in fresh:
                kind = dtype if p.is_floating_point() else p.dtype
                new = nn.Parameter(
                    torch.empty(p.shape, device=device, dtype=kind), requires_grad=False
                )
                new.__dict__.update(p.__dict__)
                fresh[id(p)] = new
            module._parameters[key] = fresh[id(p)]
        for key, b in module._buffers.items():
            if b is not None and b.is_meta:
                raise ValueError(f"buffer {key} of {type(module).__name__} was built on meta")
            if b is not None:
                module._buffers[key] = b.to(device)


def build_stage(
    spec: ModelSpec,
    state: ParallelState,
    dtype: torch.dtype,
    stage_splits: list[int] | None = None,
    host_layers=None,
) -> tuple[nn.Module, range]:
    """This rank's stage of the model, built on meta then materialised (uninitialised) on
    `state.device` in `dtype`; returns (model, the range of layers it owns).

    Layers of other stages become nn.Identity (names of kept ones stay as in the checkpoint);
    `first_stage_modules` / `last_stage_modules` are dropped (None) off their stage.
    `host_layers(model, layers) -> [index]` (pooled weights, energon/pool/offload.py) names
    layers materialised on the cpu instead, to be moved into pooled memory after loading.
    Raises CheckpointError when tp does not divide a split dimension, ValueError on a bad cut.
    """
    with use_parallel(state), torch.device("meta"):
        model = spec.model_class(spec.config)
    layers = cut_stages(len(model.layers), state.pp_size, stage_splits)[state.stage]
    for i in range(len(model.layers)):
        if i not in layers:
            model.layers[i] = nn.Identity()
    if not state.is_first_stage:
        for path in model.first_stage_modules:
            drop_module(model, path)
    if not state.is_last_stage:
        for path in model.last_stage_modules:
            drop_module(model, path)
    # pooled layers: materialised on the cpu (energon/pool/offload.py moves them after loading)
    on_host = {i: model.layers[i] for i in (host_layers(model, layers) if host_layers else ())}
    for i in on_host:
        model.layers[i] = nn.Identity()
    materialize(model, state.device, dtype)
    for i, layer in on_host.items():
        materialize(layer, torch.device("cpu"), dtype)
        model.layers[i] = layer
    return model.eval(), layers


class ModelRunner(OffloadMember):
    """One worker's share of a model. Every public method is called on all ranks, in order.

    `pool` (the Engine's pool options, energon/pool/offload.py) lets a stage whose weights
    exceed its budget keep some layers' weights in pooled memory; OffloadMember adds the
    pool_* methods the controller's pool service calls."""

    def __init__(
        self,
        model: str,
        tp: int = 1,
        pp: int = 1,
        dtype: str = "float32",
        device: str = "cpu",
        init_method: str | None = None,
        stage_splits: list[int] | None = None,
        seed: int = 0,
        rank: int | None = None,
        pool: dict | None = None,
        decode_graphs: str = "auto",
        cpu_threads: int | str | None = None,
        shared_prefixes: bool = True,
    ):
        """`cpu_threads`: torch's intra-op threads in this process; "auto": `worker_threads`
        (what the Engine's workers use); None leaves them as they are (a runner built in the
        caller's process). `shared_prefixes`: whether decode steps may look for sequences
        that share cached prefix blocks (only prefix caching shares blocks: the Engine passes
        its `prefix_caching`); False also captures no graphs for such steps."""
        if rank is None:
            from energon.actors import actor_context

            rank = actor_context().rank
        self.spec = resolve(model)
        self.device = pick_device(device, rank)
        if cpu_threads is not None:
            auto = cpu_threads == "auto"
            torch.set_num_threads(worker_threads(self.device, tp * pp) if auto else cpu_threads)
        self.dtype = pick_dtype(dtype, self.spec.config, self.device)
        self.state = init_parallel(Topology(tp, pp), rank, init_method, self.device)
        # one-shot all-reduce over NVLink for small messages (ENERGON_ALL_REDUCE=nccl: off);
        # a line saying what the tp group's all-reduces use
        self.all_reduce = enable_fast_all_reduce(self.state, dtype=self.dtype)
        self.model, self.layer_range = build_stage(
            self.spec, self.state, self.dtype, stage_splits, self._offload_planner(pool)
        )
        if self.spec.is_preset:
            self.report = random_init(self.model, seed)
        else:
            self.report = load_weights(self.model, self.spec.folder, self.state)
        self._prepare_offload()  # staging buffers for pooled layers, if any (OffloadMember)
        if self.offload is None:  # pooled layers' weights move later: they keep their layout
            for module in self.model.modules():
                if (after_load := getattr(module, "after_load", None)) is not None:
                    after_load()  # e.g. merge q/k/v weights for one GEMM (layers.merge_columns)
        # decode steps read a prefix their sequences share once a group where the paged decode
        # kernel runs (energon/parallel/shared_prefix.py; ENERGON_SHARED_PREFIX=0: off)
        attention = next((m for m in self.model.modules() if isinstance(m, Attention)), None)
        self.shares_prefixes = (
            shared_prefixes
            and os.environ.get(SHARED_PREFIX_ENV, "1") != "0"
            and attention is not None
            and attention.reads_shared_prefixes(self.device, self.dtype)
        )
        self.hidden_size = getattr(self.model, "hidden_size", None) or hidden_size_of(
            self.spec.config
        )
        self.block_size: int | None = None
        self.kv_cache_bytes = 0
        # Every tp rank of the last stage holds the same logits; rank 0 samples and replies.
        self.sampler = Sampler(self.device, seed)
        self.chained_steps = 0  # steps that fed sampled tokens on the device
        # greedy steps whose tokens came out of a decode graph (its argmax after the head), on
        # every tp rank of the last stage; `_graph_tokens` the latest step's, if it ran one
        self.graph_greedy_steps = 0
        self._graph_tokens: torch.Tensor | None = None
        self.shared_prefix_steps = 0  # decode steps that read their groups' prefixes once
        # what chained steps feed: the samples of steps in flight (lookahead; at pp > 1 handed
        # from the last stage to the first, energon/parallel/token_return.py)
        self.returns = TokenReturn(self.state, self.device)
        self.decode_graphs = self._graph_mode(decode_graphs)
        self.graphs: DecodeGraphs | None = None
        # decode graphs of steps with groups sharing prefix blocks (with `shares_prefixes`)
        self.shared_graphs: DecodeGraphs | None = None
        # graphs of prefills of new prompts: with the decode graphs, unless ENERGON_PREFILL_GRAPHS=0
        self.prefill_graphs: PrefillGraphs | None = None
        self.graph_error: str | None = None  # why capturing failed, if it did
        # Called with "received" once a later stage's input is here and "output" once a stage's
        # output is computed, before it goes downstream (the bench's stage timeline); None: no
        # calls.
        self.on_io: Callable[[str], None] | None = None

    def _graph_mode(self, mode: str) -> str:
        """ "capture" (CUDA graphs of decode steps), "static" (their static-buffer path run
        eagerly: tests on cpu) or "off". "auto" captures on cuda unless something per step
        would be frozen into the graph: pooled layers (prefetch hooks) or dynamic-NTK RoPE
        (which depends on each step's longest context)."""
        if mode not in ("auto", "capture", "static", "off"):
            raise ValueError(f"decode_graphs must be auto, capture, static or off (got {mode!r})")
        dynamic_rope = rope_parameters(self.spec.config)["rope_type"] == "dynamic"
        frozen = self.offload is not None or dynamic_rope
        if mode == "auto":
            mode = "capture" if self.device.type == "cuda" and not frozen else "off"
        if mode == "capture" and self.device.type != "cuda":
            raise ValueError("decode_graphs='capture' needs a cuda device")
        return "off" if frozen else mode

    # -- steps -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, input_ids: torch.Tensor | None, meta: BatchMeta) -> torch.Tensor | None:
        """This stage's share of one step; the last stage returns logits on every tp rank."""
        s = self.state
        if s.is_first_stage:
            x = input_ids
        else:
            shape = (meta.num_tokens, self.hidden_size)
            x = recv_activation(shape, self.dtype, s.prev_rank, self.device, s.prev_group)
            if self.on_io is not None:
                self.on_io("received")
        return self._pass_on(self._stage(x, meta))

    def _stage(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """The stage's body: token ids (first stage) or activations in, activations or (last
        stage) logits out. Decode graphs capture exactly this."""
        s = self.state
        hidden = self.model.embed(x, meta) if s.is_first_stage else x
        hidden = run_layers((self.model.layers[i] for i in self.layer_range), hidden, meta)
        return self.model.head(hidden, meta) if s.is_last_stage else hidden

    def _receive_into(self, buffer: torch.Tensor) -> None:
        dist.recv(buffer, self.state.prev_rank, group=self.state.prev_group)
        if self.on_io is not None:
            self.on_io("received")

    def _pass_on(self, out: torch.Tensor) -> torch.Tensor | None:
        """Sends a stage's activations downstream (None), or returns the last stage's logits."""
        if self.state.is_last_stage:
            return out
        if self.on_io is not None:
            self.on_io("output")
        send_activation(out, self.state.next_rank, self.state.next_group)
        return None

    def _returns(self, logits: torch.Tensor | None) -> bool:
        return logits is not None and self.state.tp_rank == 0

    def forward(self, token_lists: list[list[int]]) -> torch.Tensor | None:
        """Padding-free pass: float32 logits [T, V] for every packed token (cpu), on the last
        stage's tp rank 0; None elsewhere. Raises ValueError on an empty sequence."""
        input_ids, meta = pack(token_lists, self.device)
        logits = self._run(input_ids, meta)
        return logits.float().cpu() if self._returns(logits) else None

    @torch.inference_mode()
    def prompt_logprobs(self, token_lists: list[list[int]], top: int) -> list[list[dict]] | None:
        """Padding-free pass; per sequence, for each token after the first, its log probability
        given the ones before and the `top` most likely there (Sampler's rows), on the last
        stage's tp rank 0; None elsewhere."""
        input_ids, meta = pack(token_lists, self.device)
        logits = self._run(input_ids, meta)
        if not self._returns(logits):
            return None
        out, start = [], 0
        for ids in token_lists:
            rows: list[dict] = []
            # float64 rows of the vocabulary: a bounded number at a time
            for i in range(1, len(ids), PROMPT_LOGPROB_ROWS):
                stop = min(i + PROMPT_LOGPROB_ROWS, len(ids))
                targets = torch.tensor(ids[i:stop], dtype=torch.int64).to(self.device)
                chunk = logits[start + i - 1 : start + stop - 1]
                rows.extend(logprob_rows(chunk, targets, [top] * (stop - i)))
            out.append(rows)
            start += len(ids)
        return out

    def forward_padded(self, token_lists: list[list[int]]) -> torch.Tensor | None:
        """The padded baseline: same result as `forward`, computed on [B, Lmax] with pads that are
        carried through every layer and discarded at the end."""
        input_ids, meta, real_rows = pad(token_lists, 0, self.device)
        logits = self._run(input_ids, meta)
        return logits[real_rows].float().cpu() if self._returns(logits) else None

    def init_kv_cache(self, num_blocks: int, block_size: int) -> dict:
        """Allocate this stage's paged KV cache ([2, blocks, block_size, kv_heads, head_dim] per
        layer, zeroed); returns {"layers", "bytes", "graphs"}. Replaces any earlier cache.

        With decode graphs the cache has one more block, a scratch block for the graphs' pad
        rows that no sequence is ever given, and the graphs are captured here."""
        self.block_size = block_size
        self.kv_cache_bytes = 0
        self.graphs = self.shared_graphs = self.prefill_graphs = None
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for attn in layers:
            attn.kv_cache = None
        scratch = self._scratch_blocks
        for attn in layers:
            shape = (2, num_blocks + scratch, block_size, attn.num_kv_heads, attn.head_dim)
            attn.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.kv_cache_bytes += attn.kv_cache.numel() * attn.kv_cache.element_size()
        if scratch:
            self._build_graphs(scratch_block=num_blocks)
        return {
            "layers": len(layers),
            "bytes": self.kv_cache_bytes,
            "graphs": len(self.graphs.graphs) if self.graphs else 0,
            "prefill_graphs": len(self.prefill_graphs.graphs) if self.prefill_graphs else 0,
        }

    @property
    def _scratch_blocks(self) -> int:
        """KV blocks beyond the scheduler's: the decode graphs' pad block, when they are on."""
        return 0 if self.decode_graphs == "off" else 1

    @torch.inference_mode()
    def _build_graphs(self, scratch_block: int) -> None:
        """The decode graphs of this stage, then its prefill graphs (energon/prefill_graphs.py).
        A capture that fails (a kernel or collective this torch cannot capture) leaves those
        steps eager, with a warning and the reason in `info()["graph_error"]`: graphs are a
        speed-up, never a reason not to serve. Every rank captures the same graphs in the same
        order (their collectives pair up)."""
        capture = self.decode_graphs == "capture"
        self.graphs = self._captured(
            "decode", lambda: self._decode_graphs(scratch_block, capture), capture
        )
        # the tp ranks skip the tokens' broadcast after a greedy graph step together
        self.graphs = self._on_every_tp_rank(self.graphs)
        if self.graphs is None:
            self.decode_graphs = "off"
        elif self.shares_prefixes:
            self.shared_graphs = self._on_every_tp_rank(
                self._captured(
                    "shared-prefix decode",
                    lambda: self._decode_graphs(scratch_block, capture, groups=MAX_GROUPS),
                    capture,
                )
            )
        if os.environ.get(PREFILL_GRAPHS_ENV, "1") == "0":
            return
        self.prefill_graphs = self._captured(
            "prefill", lambda: self._prefill_graphs(scratch_block, capture), capture
        )
        self.prefill_graphs = self._on_every_tp_rank(self.prefill_graphs)

    def _on_every_tp_rank(self, graphs):
        """`graphs` where every tp rank of the stage has its own, else None: a graph pads its
        all-reduces, so the ranks must replay the same graphs."""
        if self.state.tp_size > 1:
            ok = torch.tensor([int(graphs is not None)], device=self.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.state.tp_group)
            if not ok.item():
                return None
        return graphs

    def _captured(self, kind: str, build: Callable, capture: bool):
        """`build()`, or None when capturing failed: a warning, and the reason joins
        `graph_error`. Without `capture` (the static path runs the eager code) errors are bugs
        and raise."""
        try:
            return build()
        except Exception as exc:
            if not capture:
                raise
            reason = f"{kind}: {type(exc).__name__}: {exc}"
            self.graph_error = f"{self.graph_error}; {reason}" if self.graph_error else reason
            log.warning("energon: %s graphs not captured, running eagerly (%s)", kind, exc)
            return None

    def _prefill_graphs(self, scratch_block: int, capture: bool) -> PrefillGraphs | None:
        """The prefill graphs, for contexts up to the graphs' window (the model's, at most
        MAX_GRAPH_CONTEXT and what the cache holds): a graph runs its whole bucket at positions
        0..bucket-1 when it is captured, reading its keys through its block table, so no bucket
        may pass the window; None if none fits."""
        window = self._graph_window(scratch_block)
        buckets = tuple(b for b in PREFILL_BUCKETS if b <= window)
        if not buckets:
            return None
        return PrefillGraphs(
            last_stage=self.state.is_last_stage,
            max_blocks=-(-window // self.block_size),
            buckets=buckets,
            **self._graph_options(scratch_block, capture),
        )

    def _graph_options(self, scratch_block: int, capture: bool) -> dict:
        """What both graph kinds are built from: this stage's body, its input, the cache."""
        return dict(
            body=self._stage,
            first_stage=self.state.is_first_stage,
            hidden_size=self.hidden_size,
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            scratch_block=scratch_block,
            capture=capture,
        )

    def _graph_window(self, scratch_block: int) -> int:
        """The longest context a graph reads (its block tables' width): the model's window, at
        most MAX_GRAPH_CONTEXT and what the cache holds."""
        return min(
            context_window(self.spec.config) or MAX_GRAPH_CONTEXT,
            MAX_GRAPH_CONTEXT,
            scratch_block * self.block_size,  # the scratch block's id is the cache's block count
        )

    def _decode_graphs(self, scratch_block: int, capture: bool, groups: int = 0) -> DecodeGraphs:
        """The decode graphs; with `groups`, those of steps with up to that many groups of
        sequences sharing prefix blocks (no batch of one: a group has two sequences at least),
        each group's prefix cut in as many parts as one group with the longest prefix needs."""
        window = self._graph_window(scratch_block)
        options = {}
        if groups:
            attention = next(m for m in self.model.modules() if isinstance(m, Attention))
            parts = num_parts(1, window, attention.num_kv_heads, self.device)
            buckets = tuple(b for b in DECODE_BUCKETS if b > 1)
            options = dict(groups=groups, prefix_parts=parts, buckets=buckets)
        return DecodeGraphs(
            max_blocks=-(-window // self.block_size),
            greedy=self.state.is_last_stage,
            **options,
            **self._graph_options(scratch_block, capture),
        )

    def step_meta(self, step: dict) -> tuple[torch.Tensor | None, BatchMeta]:
        """(input_ids on device, BatchMeta) of a step dict; raises ValueError when malformed.
        Later stages take activations, not ids: None there (the ids are only counted, so that
        a malformed step fails on every stage alike)."""
        if self.block_size is None:
            raise ValueError("call init_kv_cache(num_blocks, block_size) before execute")
        meta = BatchMeta.for_step(
            list(step["query_lens"]),
            list(step["context_lens"]),
            step["block_tables"],  # lists, or the step message's padded tensor
            self.block_size,
            step.get("logits_indices", "last"),
            self.device,
        )
        if not self.state.is_first_stage:
            _check_ids(step, meta.num_tokens)
            return None, meta
        return self._step_ids(step, meta.num_tokens), meta

    def _step_ids(self, step: dict, num_tokens: int) -> torch.Tensor:
        """The first stage's input ids on the device. A chained step's rows (lookahead) get the
        tokens the step it chains sampled, on the device: the controller does not know them
        yet."""
        ids = _input_ids(step, num_tokens).to(self.device, non_blocking=True)
        if "chain_from" not in step:
            return ids
        tokens = self._chained_tokens(step["chain_from"])
        self.chained_steps += 1
        dst, src = list(step["chain_tokens"]), list(step["chain_rows"])
        if len(dst) != len(src) or (
            dst
            and not (
                0 <= min(dst) <= max(dst) < num_tokens and 0 <= min(src) <= max(src) < len(tokens)
            )
        ):
            raise ValueError(
                "chain_tokens and chain_rows must pair tokens of this step with rows the step "
                f"it chains sampled ({num_tokens} tokens, {len(tokens)} rows)"
            )
        if dst == src == list(range(len(src))):  # the usual case: the same batch again
            ids[: len(src)] = tokens[: len(src)]
        else:
            ids[to_device(dst, torch.int64, self.device)] = tokens[
                to_device(src, torch.int64, self.device)
            ]
        return ids

    def _chained_tokens(self, chain_from: int) -> torch.Tensor:
        """The tokens that step `chain_from` sampled (every tp rank gets them from rank 0,
        unless each kept its own: a greedy graph step's); ValueError if they are not here."""
        s = self.state
        everywhere = self.returns.everywhere(chain_from)
        tokens, count = self.returns.take(chain_from)
        if tokens is None and s.tp_rank == 0:
            raise ValueError(f"step {chain_from} sampled no tokens here")
        if s.tp_size > 1 and not everywhere:
            if tokens is None:
                tokens = torch.empty(count, dtype=torch.int64, device=self.device)
            root = s.topology.rank_of(s.stage, 0)
            dist.broadcast(tokens, root, group=s.tp_group)
        return tokens

    def execute_logits(self, step: dict) -> torch.Tensor | None:
        """One cached prefill/decode step; logits stay on the device (last stage, every tp rank).

        Writes the new tokens' K/V into the cache. No host sync beyond the host→device copies.
        Decode steps, and steps of up to 8 prompts (whole or after a cached prefix) that fit a
        graph, replay one."""
        self._graph_tokens = None
        if (
            self.prefill_graphs is not None
            and self.prefill_graphs.takes(step["query_lens"], step["context_lens"])
            and step.get("logits_indices", "last") == "last"
            and "chain_from" not in step
        ):
            return self._prefill_graph_step(step)
        shared = self._shared_prefixes(step)
        if shared is not None and self._graph_takes(self.shared_graphs, step, shared):
            self.shared_prefix_steps += 1
            return self._graph_step(step, self.shared_graphs, shared)
        # Else a plain graph, reading any shared prefix once a sequence: eager from Python, a
        # batch-64 step of opt-13b took longer than the reads it saved (docs/benchmarks.md,
        # "Shared-prefix decode attention"). Steps past every graph run eagerly, groups and all,
        # those that mix decodes with prompt chunks too (groups among their decodes).
        if self._graph_takes(self.graphs, step):
            return self._graph_step(step, self.graphs)
        input_ids, meta = self.step_meta(step)
        if shared is not None:
            meta.shared = shared.to(self.device)
            self.shared_prefix_steps += 1
        elif meta.parts is not None and self.shares_prefixes:  # decodes beside prompt chunks
            if share_in_parts(
                meta,
                list(step["query_lens"]),
                list(step["context_lens"]),
                step["block_tables"],
                self.block_size,
            ):
                self.shared_prefix_steps += 1
        return self._run(input_ids, meta)

    @staticmethod
    def _graph_takes(
        graphs: DecodeGraphs | None, step: dict, shared: SharedPrefixes | None = None
    ) -> bool:
        """Whether `graphs` replay this step: a decode step whose tables came as a tensor,
        logits of its last tokens (every row is one), within the graphs' batch and width."""
        tables = step["block_tables"]
        return (
            graphs is not None
            and isinstance(tables, torch.Tensor)
            and step.get("logits_indices", "last") in ("last", "all", None)
            and graphs.takes(list(step["query_lens"]), tables.shape[1], shared)
        )

    def _shared_prefixes(self, step: dict) -> SharedPrefixes | None:
        """A decode step's groups of sequences that share cached prefix blocks, where the
        kernel reads them once (`shares_prefixes`); None for any other step."""
        if not self.shares_prefixes:
            return None
        return find_shared_prefixes(
            list(step["query_lens"]),
            list(step["context_lens"]),
            step["block_tables"],
            self.block_size,
        )

    def _graph_step(
        self, step: dict, graphs: DecodeGraphs, shared: SharedPrefixes | None = None
    ) -> torch.Tensor | None:
        context_lens = list(step["context_lens"])
        tables = step["block_tables"]
        if len(context_lens) != len(step["query_lens"]) or tables.shape[0] != len(context_lens):
            raise ValueError("need one context_len and one block table per query_len")
        logits = self._replay(
            step,
            len(context_lens),
            lambda x, receive: graphs.run(x, context_lens, tables, receive=receive, shared=shared),
        )
        self._graph_tokens = graphs.tokens
        return logits

    def _prefill_graph_step(self, step: dict) -> torch.Tensor | None:
        query_lens = [int(q) for q in step["query_lens"]]
        context_lens = [int(c) for c in step["context_lens"]]
        tables = step["block_tables"]
        return self._replay(
            step,
            sum(query_lens),
            lambda x, receive: self.prefill_graphs.run(
                query_lens, context_lens, tables, x, receive
            ),
        )

    @torch.inference_mode()
    def _replay(self, step: dict, num_tokens: int, run: Callable) -> torch.Tensor | None:
        """A step a graph takes: `run(x, receive)` with the step's ids on the first stage, else
        with this stage's receive into the graph's input buffer."""
        s = self.state
        if s.is_first_stage:
            out = run(self._step_ids(step, num_tokens), None)
        else:
            out = run(None, self._receive_into)
        # The graph's output buffer is overwritten by the next replay while a queued send may
        # still read it: what goes downstream is a copy the allocator keeps alive for the send.
        return self._pass_on(out if s.is_last_stage else out.clone())

    def execute(self, step: dict) -> torch.Tensor | None:
        """`execute_logits` returned as float32 cpu logits [N, V] on the last stage's tp rank 0
        (N = sequences for logits_indices="last", new tokens for "all"); None elsewhere."""
        logits = self.execute_logits(step)
        return logits.float().cpu() if self._returns(logits) else None

    def kv_blocks_fit(self, block_size: int, memory: int | None = None) -> int:
        """How many KV blocks of `block_size` tokens this stage can hold in `memory` bytes, or by
        default in all the room the device has for them (`_kv_room`), on cpu 256 MiB. Raises
        ValueError when `memory` is more than that room: the cache could not be allocated."""
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in layers)
        per_block = max(
            1, per_token * block_size * torch.empty((), dtype=self.dtype).element_size()
        )
        room = self._kv_room()
        if memory is None:
            memory = 256 << 20 if room is None else room
        elif room is not None and memory > room:
            raise ValueError(
                f"is {memory} bytes, more than the {max(room, 0)} bytes worker "
                f"{self.state.rank} has room for (90% of its free memory less 2 GiB for "
                f"activations); ask for less or leave it unset"
            )
        return max(0, memory // per_block - self._scratch_blocks)

    def _kv_room(self) -> int | None:
        """Bytes the device can give the KV cache: on cuda 90% of its free memory less a reserve
        for activations; None on cpu (no bound but the host's)."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(free * 0.9) - (2 << 30)

    @torch.inference_mode()
    def sample_step(self, step: dict) -> dict | Deferred | None:
        """Run one step of `energon.step.step_message` and sample the rows it marks. Returns
        {"step_id", "token_ids", "logprobs"} on the last stage's tp rank 0, None elsewhere.

        On cuda the reply is a `Deferred`: the token ids are copied to pinned memory behind the
        step, and the worker starts the next step (already waiting, with lookahead) before it
        waits for them, so the GPU goes from step to step without a gap."""
        self.sampler.release(step.get("release", ()))
        logits = self.execute_logits({**step, "logits_indices": "last"})
        picked = [i for i, flag in enumerate(step["sample"]) if flag]
        chainable = "hand_back" in step and bool(picked)  # a later step may feed its samples
        if "hand_back" in step and self.returns.expects:
            self.returns.forget_before(step["hand_back"])
            if chainable:
                self.returns.expect(step["step_id"], len(picked))
        step_id = step["step_id"]
        greedy = self._graph_greedy(step, picked)
        # every tp rank keeps them: a step chaining this one needs no broadcast
        everywhere = greedy and chainable and self.returns.local
        returns = self._returns(logits)
        token_ids = None
        if greedy and (returns or everywhere):  # the other ranks leave the graph's tokens be
            token_ids = self._graph_token_ids(picked, chainable)
        if everywhere:
            self.returns.keep(step_id, token_ids, everywhere=True)
        if not returns:
            return None
        if not picked:
            return {"step_id": step_id, "token_ids": [], "logprobs": None}
        logprobs = None
        if token_ids is None:
            if len(picked) < logits.shape[0]:
                logits = logits[to_device(picked, torch.int64, logits.device)]
            token_ids, logprobs = self.sampler.sample(
                logits, step["params"], step["steps"], step.get("features")
            )
        if chainable and self.returns.keeps and not everywhere:
            self.returns.keep(step_id, token_ids)
        if self.device.type != "cuda" or logprobs is not None:  # logprobs synced already
            return {"step_id": step_id, "token_ids": token_ids.tolist(), "logprobs": logprobs}
        host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host.copy_(token_ids, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return Deferred(
            lambda: {"step_id": step_id, "token_ids": host.tolist(), "logprobs": None},
            copied.synchronize,
        )

    def _graph_greedy(self, step: dict, picked: list[int]) -> bool:
        """Whether the picked rows' tokens come from the decode graph's argmax: the step
        replayed one that computes it and every picked row is plain greedy (no draw, ban,
        penalty, bias or logprobs: the Sampler would take the same argmax). The same answer on
        every tp rank (same step, same graphs); counted."""
        if self._graph_tokens is None or not picked:
            return False
        if step_features(step["params"], step.get("features")):
            return False
        self.graph_greedy_steps += 1
        return True

    def _graph_token_ids(self, picked: list[int], kept: bool) -> torch.Tensor:
        """The picked rows' tokens out of the graph (`_graph_greedy`); `kept`: a later step may
        chain them, so a copy (the graph's buffer is the next replay's)."""
        tokens = self._graph_tokens
        if len(picked) < tokens.shape[0]:
            return tokens[to_device(picked, torch.int64, tokens.device)]
        return tokens.clone() if kept else tokens

    # -- facts -------------------------------------------------------------------------------

    def load_report(self) -> dict:
        """What this rank read: {"source", "tensors", "bytes", "reads": [[tensor, file, index, bytes]]}."""
        return self.report.to_dict()

    def info(self) -> dict:
        """This rank's place and share: rank, stage, tp_rank, layers [start, stop), device, dtype."""
        s = self.state
        fast = fast_all_reduce(s.tp_group)
        return {
            "rank": s.rank,
            "stage": s.stage,
            "tp_rank": s.tp_rank,
            "layers": [self.layer_range.start, self.layer_range.stop],
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vocab_size": self.spec.config.get("vocab_size"),
            "decode_graphs": self.decode_graphs,
            "graph_steps": self.graphs.steps if self.graphs else 0,
            "shared_graph_steps": self.shared_graphs.steps if self.shared_graphs else 0,
            "prefill_graph_steps": self.prefill_graphs.steps if self.prefill_graphs else 0,
            "graph_error": self.graph_error,
            "chained_steps": self.chained_steps,
            "graph_greedy_steps": self.graph_greedy_steps,  # tokens from the graph's argmax
            "shares_prefixes": self.shares_prefixes,  # decode steps look for shared blocks
            "shared_prefix_steps": self.shared_prefix_steps,
            "returns_pending": self.returns.pending,  # samples chained steps may feed, held
            "penalised_seqs": len(self.sampler.penalties.slots),  # sequences' tokens kept
            "all_reduce": self.all_reduce,
            # (one-shot sums, of them fused with a norm, of those the GEMV's push) issued; a
            # captured one counts once
            "one_shot_calls": (
                (fast.one_shot_calls, fast.norm_calls, fast.push_calls) if fast else (0, 0, 0)
            ),
            "early_weight_gemvs": EarlyWeights.calls,  # GEMVs on gemv_tma.py issued
            "early_weight_error": EarlyWeights.error,  # why it fell back, or None
            "cpu_threads": torch.get_num_threads(),
        }

    def memory(self) -> dict:
        """Bytes held: parameters, KV cache, and (on cuda) the allocator's allocated/reserved,
        with its counts so far of cudaMalloc and cudaFree calls and of retries (a request that
        found no cached block freed the cache and tried again: cudaFree waits for the device)."""
        params = {id(p): p.numel() * p.element_size() for p in self.model.parameters()}
        out = {"param_bytes": sum(params.values()), "kv_cache_bytes": self.kv_cache_bytes}
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            out["allocated_bytes"] = stats.get("allocated_bytes.all.current", 0)
            out["reserved_bytes"] = stats.get("reserved_bytes.all.current", 0)
            for name in ("num_device_alloc", "num_device_free", "num_alloc_retries"):
                out[name] = stats.get(name, 0)
            free, total = torch.cuda.mem_get_info(self.device)
            out["free_bytes"], out["total_bytes"] = free, total
        return out

    def drop_returns(self, before: int) -> None:
        """The controller will chain no step before `before` (it went idle): the first stage
        drops those steps' handed-back tokens, posting the receives still unposted
        (energon/parallel/token_return.py); a no-op elsewhere."""
        self.returns.forget_before(before)

    def close(self) -> None:
        """Leave the process group (call on every rank)."""
        import torch.distributed as dist

        self.returns.forget_before(math.inf)  # post the receives no step asked for
        if dist.is_initialized():
            dist.destroy_process_group()


def _input_ids(step: dict, num_tokens: int) -> torch.Tensor:
    """The step's token ids as an int64 tensor (host); ValueError unless there are num_tokens."""
    _check_ids(step, num_tokens)
    return torch.as_tensor(step["input_ids"], dtype=torch.int64)


def _check_ids(step: dict, num_tokens: int) -> None:
    if len(step["input_ids"]) != num_tokens:
        raise ValueError(
            f"input_ids has {len(step['input_ids'])} tokens but query_lens sum to {num_tokens}"
        )


def hidden_size_of(config: dict) -> int:
    """The width of activations between stages, under the names HF configs use."""
    for key in ("hidden_size", "n_embd", "d_model", "n_embed"):
        if key in config:
            return config[key]
    raise ValueError("config names no hidden size (hidden_size / n_embd / d_model)")


__all__ = ["LoadReport", "ModelRunner"]
