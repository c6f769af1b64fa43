"""Decoding with a static KV cache: one fixed-shape step per token, replayed as a CUDA graph or compiled.

    python scripts/generate.py ckpt=RUN device=cuda prompt="..."         # decode=auto: the CUDA graph on CUDA
    python scripts/benchmark_generate.py --device cuda --dtype bf16 --decode eager,graph,compile   # the speed
    python -m pytest tests/test_decoding.py                              # against decode_step (-m cuda: on a GPU)

    list(generate(model, prompt, max_new_tokens=256, temperature=0, decode="graph"))  # roformer.generation

Batch-1 decoding of a small model on a GPU is bound by launching kernels, not by doing them: the general
``decode_step`` launches a few hundred small kernels per token from Python, and the GPU waits for each launch. A
:class:`StaticDecoder` makes every tensor of the step fixed in shape and address so the whole step can be captured
once and replayed for each token:

* per layer, key/value buffers ``(B, H, capacity, D)`` in the activation dtype, allocated once;
* the current position as a device tensor ``(1,)``, advanced in place by the step itself;
* the scheme's position tables for every position up to ``capacity``, made by the scheme's own ``context`` (so a
  scaled RoPE gives the angles of the model's forward), from which the step picks its row with ``index_select``;
* the step: embedding (plus the scheme's ``embed`` at the position), per block layer norm, qkv, the scheme's
  ``rotate`` with that row, ``index_copy_`` of k and v into the buffers at the position, attention over the whole
  buffer with an additive mask that is 0 at positions <= the current one and -inf after, projection, MLP; final
  norm and LM head; the argmax is written into the token buffer, so greedy steps chain on the device.

How the step runs (``run``):

* ``eager``: called as Python, on any device (what the CPU tests check against ``decode_step``);
* ``graph``: captured once with ``torch.cuda.CUDAGraph`` after a warm-up on a side stream, replayed per token. No
  compile time; every kernel of the step is still its own kernel, launched by the GPU from the graph;
* ``compile``: ``torch.compile(step, mode="reduce-overhead", fullgraph=True)``: inductor fuses the step's
  elementwise work and CUDA-graphs the result (on a CPU, inductor alone). The key/value, token and position
  buffers are marked with ``torch._dynamo.mark_static_address`` (the idea of Hugging Face's ``StaticCache``), so
  their in-place updates do not make the CUDA-graph backend skip the graph. Costs a compile per decoder;
* ``compile-graph``: the compiled step without inductor's CUDA-graph trees, captured in a CUDA graph of our own
  (fused kernels, and no per-call guard or graph-tree bookkeeping on the host).

The prompt runs through the model's ordinary forward into an ordinary :class:`~roformer.model.KVCache`; its keys
and values are then copied into the static buffers. Where the step is not the model's forward (a score-bias
scheme, linear attention, dynamic NTK past its original length, training mode) :func:`unsupported` says why, and
:func:`roformer.generation.generate` keeps to the cached path. Building a graph or a compiled step is checked
against the eager step before use (:meth:`StaticDecoder._self_check`); a failure anywhere is logged with its
reason and the caller falls back, never crashes. gpt-fast (pytorch-labs) and Hugging Face's static cache were
read for ideas; the code is this project's.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from roformer.model import AttentionKind, KVCache, TransformerLM
from roformer.positional import PosContext

log = logging.getLogger(__name__)

RUNS = ("eager", "graph", "compile", "compile-graph")
# Buffers are sized in multiples of this (a reused decoder then serves the next, slightly longer, call too; a
# multiple of 16 also keeps the attention mask's rows aligned for the fused attention kernels).
CAPACITY_STEP = 256


def unsupported(model: TransformerLM, capacity: int) -> str | None:
    """Why the static step cannot reproduce the model's forward for sequences of up to ``capacity`` positions, or
    None when it can. The step is ``decode_step``'s case: softmax attention in eval mode, a scheme without a score
    bias whose tables do not depend on the total length."""
    if model.training:
        return "the model is in training mode (dropout); call model.eval()"
    if model.cfg.attention != AttentionKind.softmax:
        return f"model.attention={model.cfg.attention.value} keeps a running state, not keys and values"
    if model.pos.has_bias:
        return f"pos={model.pos.name} adds a bias to the attention scores"
    if not model.pos.qk_alike:
        return f"pos={model.pos.name} transforms queries and keys differently"
    if model.pos.randomized:
        return f"pos.randomized_max={model.pos.cfg.randomized_max}: positions are drawn, not counted"
    if not model.pos.same_rotation(1, capacity):
        return (f"pos={model.pos.name} with scaling={model.pos.cfg.scaling.value} changes its rotation with the "
                f"total length before {capacity} positions (dynamic NTK past its original length)")
    limit = model.pos.max_positions(model.pos.cfg)
    if limit is not None and capacity > limit:
        return f"{capacity} positions pass the position table (pos.max_len={limit})"
    return None


def capacity_for(model: TransformerLM, need: int) -> int:
    """Buffer length for ``need`` positions: rounded up to CAPACITY_STEP where the scheme allows, else ``need``."""
    cap = math.ceil(need / CAPACITY_STEP) * CAPACITY_STEP
    limit = model.pos.max_positions(model.pos.cfg)
    if limit is not None:
        cap = min(cap, limit)
    if not model.pos.same_rotation(1, cap):  # dynamic NTK: do not ask for tables the forward would not use
        cap = need
    return max(cap, need)


def weights_key(model: TransformerLM) -> tuple:
    """Identity and version of every parameter: a captured graph reads them by address, so an optimizer step,
    load_state_dict or model.to(...) (each changes one of the two) needs a new decoder."""
    # an inference tensor has no version counter, and cannot be changed outside inference mode anyway
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version, p.dtype) for p in model.parameters())


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class StaticDecoder:
    """Static-cache decoding of ``model`` for ``batch`` rows and up to ``capacity`` positions.

    ``prefill(ids)`` runs a prompt; ``step(tok)`` feeds one token per row and returns ``(logits (B, V), argmax
    (B, 1))``, tensors that the next step overwrites; ``greedy(first, n)`` streams n greedy tokens. The autocast
    state of the caller at construction is the one every step uses. Raises ValueError when :func:`unsupported`;
    anything a graph capture or compile raises propagates (:func:`decoder_for` turns it into a fallback).
    """

    def __init__(self, model: TransformerLM, capacity: int, *, batch: int = 1, run: str = "eager") -> None:
        if run not in RUNS:
            raise ValueError(f"run={run!r} must be one of {RUNS}")
        reason = unsupported(model, capacity)
        if reason is not None:
            raise ValueError(reason)
        t0 = time.perf_counter()
        # The submodules and a weak reference to the model: the registry below holds decoders in a dict weakly
        # keyed by the model, and a strong reference back to it would keep both alive for good.
        self._model = weakref.ref(model)
        self.wte, self.blocks, self.ln_f, self.lm_head = model.wte, list(model.blocks), model.ln_f, model.lm_head
        self.pos = model.pos
        self.n_layer, self.n_head, self.head_dim = model.cfg.n_layer, model.cfg.n_head, model.cfg.head_dim
        self.capacity, self.batch, self.run = capacity, batch, run
        self.device = model.wte.weight.device
        self.autocast_dtype = _autocast_dtype(self.device)
        self.dtype = self.autocast_dtype or model.wte.weight.dtype  # the activations', as the forward has them
        self.key = weights_key(model)
        self.in_use = False
        dev, B, H, D = self.device, batch, self.n_head, self.head_dim
        # Ordinary tensors even when built under inference_mode: a later step outside it may still write them.
        with torch.inference_mode(False), torch.no_grad():
            # zeros, not empty: a masked key's weight is exactly 0, but 0 * NaN from uninitialised memory is NaN
            self.k = [torch.zeros(B, H, capacity, D, dtype=self.dtype, device=dev) for _ in range(self.n_layer)]
            self.v = [torch.zeros(B, H, capacity, D, dtype=self.dtype, device=dev) for _ in range(self.n_layer)]
            self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
            self.pos_t = torch.zeros(1, dtype=torch.long, device=dev)  # position of the token in self.tok
            self.key_pos = torch.arange(capacity, device=dev)
            ctx = self.pos.context(self.key_pos, self.key_pos, capacity, self.dtype)  # every position's tables
            self.cos = None if ctx.cos is None else ctx.cos.clone()  # (capacity, rot/2) in the activation dtype
            self.sin = None if ctx.sin is None else ctx.sin.clone()
            self.qk_scale = ctx.qk_scale
            self.mask_on = torch.zeros((), dtype=self.dtype, device=dev)
            self.mask_off = torch.full((), float("-inf"), dtype=self.dtype, device=dev)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fn = self._step
        if run == "graph":
            self._capture()
        elif run == "compile":
            self._compile()
        elif run == "compile-graph":
            self._compile_graph()
        self.build_s = time.perf_counter() - t0  # capture or compile time, for benchmarks

    # ------------------------------------------------------------------------------------------------------
    # The step

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.autocast_dtype is None:
            return self._body()
        # cache_enabled=False: autocast's cache of cast weights lives outside a CUDA graph's memory pool and is
        # cleared when the context exits, so a captured graph would read freed memory
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False):
            return self._body()

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row at position ``pos_t``: ``TransformerLM.forward`` for one query after a cache, with
        fixed shapes and no host synchronisation (what ``Block.step`` does, over static buffers)."""
        B, H, D, C = self.batch, self.n_head, self.head_dim, self.n_head * self.head_dim
        p = self.pos_t
        ctx = PosContext(q_pos=p, k_pos=self.key_pos, n_pos=self.capacity, is_causal=False,
                         cos=None if self.cos is None else self.cos.index_select(0, p),
                         sin=None if self.sin is None else self.sin.index_select(0, p), qk_scale=self.qk_scale)
        # 0 where a key is at the query's position or before, -inf after: the rest of the buffer is not yet written
        mask = torch.where(self.key_pos <= p, self.mask_on, self.mask_off)[None, :]  # (1, capacity)
        x = self.pos.embed(self.wte(self.tok), ctx)  # (B, 1, C)
        for i, block in enumerate(self.blocks):
            attn, mlp, ln_1, ln_2 = block.attn, block.mlp, block.ln_1, block.ln_2
            h = F.layer_norm(x, ln_1.normalized_shape, ln_1.weight, ln_1.bias, ln_1.eps)
            qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).view(B, 1, 3, H, D).permute(2, 0, 3, 1, 4)
            qk, v = qkv[:2], qkv[2]  # (2, B, H, 1, D), (B, H, 1, D)
            if self.qk_scale != 1.0:  # YaRN's temperature, before the rotation, as in the forward
                qk = qk * self.qk_scale
            # The query and the key sit at the same position, so one rotation of both stacked is the forward's two
            # (the scheme's hook is elementwise over leading dimensions); an empty key leaves nothing else to do.
            # Half the rotation kernels, which a CUDA graph replays one by one.
            qk, _, v = self.pos.rotate(qk, qk[:0], v, ctx)
            q, k = qk[0], qk[1]
            self.k[i].index_copy_(2, p, k.to(self.dtype))
            self.v[i].index_copy_(2, p, v.to(self.dtype))
            y = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask)  # (B, H, 1, D)
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, C), attn.proj.weight, attn.proj.bias)
            h = F.layer_norm(x, ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps)
            h = F.gelu(F.linear(h, mlp.fc.weight, mlp.fc.bias), approximate=mlp.approximate)
            x = x + F.linear(h, mlp.proj.weight, mlp.proj.bias)
        ln = self.ln_f
        x = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        logits = F.linear(x, self.lm_head.weight, self.lm_head.bias)[:, -1]  # (B, V)
        nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        self.tok.copy_(nxt)  # the next step's input when decoding greedily (sampling overwrites it)
        self.pos_t.add_(1)
        return logits, nxt

    def _reset(self, position: int = 0) -> None:
        self.pos_t.fill_(position)
        self.tok.zero_()

    # ------------------------------------------------------------------------------------------------------
    # Building a graph or a compiled step

    def _capture(self, fn=None) -> None:
        """Capture ``fn`` (default: the eager step) as a CUDA graph and replay that from now on."""
        if self.device.type != "cuda":
            raise ValueError(f"run={self.run} needs a CUDA device; the model is on {self.device}")
        ref = self._reference_steps()
        fn = fn or self._step
        with torch.cuda.device(self.device), torch.no_grad():
            # warm-up on a side stream (lazy initialisation, cuBLAS handles and workspaces, the allocator, a
            # compiled step's first launches), as torch.cuda.graphs documents; then capture one step, whose
            # kernels read the buffers by address
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._reset()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            torch.cuda.synchronize(self.device)
        self._graph, self._out = graph, out
        self._fn = self._replay
        self._self_check(ref)

    def _replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._graph.replay()
        return self._out

    def _compile(self) -> None:
        cuda = self.device.type == "cuda"
        ref = self._reference_steps()
        for t in (*self.k, *self.v, self.tok, self.pos_t, self.key_pos, self.mask_on, self.mask_off,
                  *(t for t in (self.cos, self.sin) if t is not None)):
            torch._dynamo.mark_static_address(t)
        # reduce-overhead: inductor's kernels replayed as CUDA graphs; on a CPU there is no graph to make.
        # dynamic=False: a decoder of another capacity is another graph, never a dynamic-shape one.
        compiled = torch.compile(self._step, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            # a new step for the CUDA-graph trees: the previous step's outputs are dead (its token was copied out)
            torch.compiler.cudagraph_mark_step_begin()
            return compiled()

        self._fn = run
        with torch.no_grad():
            for _ in range(3):  # compile, then the graph trees' warm-up and recording runs
                run()
        self._self_check(ref)

    def _compile_graph(self) -> None:
        """Inductor's kernels (no CUDA-graph trees) captured in one CUDA graph of our own: the fused step of
        ``compile`` without the per-call bookkeeping of the graph trees and dynamo's guards (as vLLM captures its
        compiled models itself)."""
        if self.device.type != "cuda":
            raise ValueError(f"run={self.run} needs a CUDA device; the model is on {self.device}")
        compiled = torch.compile(self._step, fullgraph=True, dynamic=False)
        with torch.no_grad():
            for _ in range(2):  # compile, and the kernels' first launches (Triton's autotuning) outside the capture
                compiled()
        self._reset()
        self._capture(compiled)

    def _reference_steps(self, n: int = 2) -> list[torch.Tensor]:
        """Logits of ``n`` eager steps from position 0 (token 0, empty buffers): what a graph or compiled step
        must reproduce. The second step reads the first one's keys and values, so a position baked into a graph
        instead of read from ``pos_t`` would show."""
        self._reset()
        with torch.no_grad():
            out = [self._step()[0].float().clone() for _ in range(n)]
        self._reset()
        return out

    def _self_check(self, ref: list[torch.Tensor]) -> None:
        """Raise unless the built step gives the eager step's logits (float rounding aside) and advances the
        position; leaves the decoder at position 0."""
        self._reset()
        with torch.no_grad():
            got = [self._fn()[0].float().clone() for _ in ref]
        advanced = int(self.pos_t.item())
        self._reset()
        bound = 1e-3 if self.dtype == torch.float32 else 5e-2  # inductor may sum in another order; bf16 rounding
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
            if not math.isfinite(err) or err > bound:
                raise RuntimeError(f"the {self.run} step's logits at step {i + 1} differ from the eager step's "
                                   f"(relative error {err:.2e} > {bound:g})")
        if advanced != len(ref):
            raise RuntimeError(f"the {self.run} step left the position at {advanced}, not {len(ref)}")

    # ------------------------------------------------------------------------------------------------------
    # Use

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ids (B, P) through the model's forward, put its keys and values into the buffers and
        return the last position's logits (B, V). The next :meth:`step` is at position P."""
        B, P = ids.shape
        if B != self.batch or P >= self.capacity:
            raise ValueError(f"a prompt of shape {tuple(ids.shape)} does not fit a decoder for {self.batch} rows "
                             f"of {self.capacity} positions")
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this decoder no longer exists")
        cache = KVCache(capacity=P)
        logits, _ = model(ids, cache=cache)
        for i in range(self.n_layer):
            k, v = cache.layers[i][:2]  # (B, H, >= P, D)
            self.k[i][:, :, :P].copy_(k[:, :, :P])
            self.v[i][:, :, :P].copy_(v[:, :, :P])
        self.pos_t.fill_(P)
        return logits[:, -1]

    def step(self, tok: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tok`` (B, 1) (None: the previous step's argmax) at the current position; return that step's
        logits (B, V) and argmax (B, 1). Both are overwritten by the next step: copy what you keep."""
        if tok is not None:
            self.tok.copy_(tok)
        with self._on_device(), torch.no_grad():
            return self._fn()

    def greedy(self, first: torch.Tensor, n: int) -> Iterator[list[int]]:
        """The greedy tokens 0 .. n-1 as lists of B ids, token 0 being ``first`` (B, 1), each next one the argmax
        after the previous. Steps run one ahead of what has been read: the GPU computes token i+1 while the host
        waits for token i (through a pinned copy and an event, since ``.item()`` would wait for the queued step
        too). A consumer that stops early leaves at most one extra step done, which the next prefill overwrites."""
        self.tok.copy_(first)
        cuda = self.device.type == "cuda"
        host = torch.empty(2, self.batch, dtype=torch.long, pin_memory=cuda)
        events = [torch.cuda.Event(), torch.cuda.Event()] if cuda else None

        def launch(i: int) -> None:
            with self._on_device(), torch.no_grad():
                if i:
                    self._fn()
                host[i % 2].copy_(self.tok.view(-1), non_blocking=cuda)
                if events:
                    events[i % 2].record(torch.cuda.current_stream(self.device))

        launch(0)
        for i in range(n):
            if i + 1 < n:
                launch(i + 1)
            if events:
                events[i % 2].synchronize()
            yield host[i % 2].tolist()

    def _on_device(self):
        """The decoder's GPU as the current one (a graph replays, and an event records, on the current stream)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    @contextmanager
    def claimed(self) -> Iterator[StaticDecoder]:
        """Mark the decoder busy for one generation: its buffers hold one sequence at a time."""
        self.in_use = True
        try:
            yield self
        finally:
            self.in_use = False


# model -> {run: its decoder}, {run: why it failed} (not tried again: a failed compile is slow to repeat), and the
# path its last generation took; weakly keyed, so a model that goes away takes its buffers and graphs with it
_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FAILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def decoder_for(model: TransformerLM, need: int, run: str) -> tuple[StaticDecoder | None, str]:
    """The model's decoder of ``run`` for batch 1 and ``need`` positions, reused while it fits (the weights, the
    positional scheme, the autocast state and the capacity), else built; or (None, why not). A ``compile`` or
    ``compile-graph`` that fails to build falls back to ``graph`` on CUDA. Every failure is logged and remembered
    for the model."""
    cap = capacity_for(model, need)
    reason = unsupported(model, cap)
    if reason is not None:
        return None, reason
    dev = model.wte.weight.device
    autocast_dtype = _autocast_dtype(dev)
    decoders, failed = _DECODERS.setdefault(model, {}), _FAILED.setdefault(model, {})
    tries = [run] + (["graph"] if run.startswith("compile") and dev.type == "cuda" else [])
    reasons = []
    for r in tries:
        if r in failed:
            reasons.append(f"run={r} failed before ({failed[r]})")
            continue
        dec = decoders.get(r)
        if dec is not None and dec.in_use:
            return None, f"its run={r} decoder is in use by another generation of this model"
        if (dec is not None and dec.capacity >= need and dec.pos is model.pos and dec.device == dev
                and dec.autocast_dtype == autocast_dtype and dec.key == weights_key(model)):
            return dec, ""
        decoders.pop(r, None)  # free the old buffers and graph before making new ones
        try:
            dec = StaticDecoder(model, cap, run=r)
        except Exception as e:  # a capture or compile that fails is a slower path, not a crash
            failed[r] = _first_line(e)
            log.warning("static decoding: run=%s failed to build (%s)%s", r, failed[r],
                        "; trying run=graph" if r != tries[-1] else "")
            reasons.append(f"run={r} failed to build ({failed[r]})")
            continue
        log.info("static decoder built: run=%s, capacity %d, %s, %.2f s", r, cap,
                 str(dec.dtype).removeprefix("torch."), dec.build_s)
        decoders[r] = dec
        return dec, ""
    return None, "; ".join(reasons)


def forget(model: TransformerLM, run: str, reason: str) -> None:
    """Drop the model's ``run`` decoder after it failed while decoding, and do not build that run again for it."""
    _DECODERS.get(model, {}).pop(run, None)
    _FAILED.setdefault(model, {})[run] = reason


def registered(model: TransformerLM, run: str) -> StaticDecoder | None:
    """The decoder of ``run`` that :func:`decoder_for` keeps for ``model``, if any."""
    return _DECODERS.get(model, {}).get(run)


def failures(model: TransformerLM) -> dict[str, str]:
    """{run: why it failed} for ``model``: runs that will not be built for it again."""
    return dict(_FAILED.get(model, {}))


def note_path(model: TransformerLM, path: str) -> None:
    _PATHS[model] = path


def last_path(model: TransformerLM) -> str | None:
    """How the model's last generation decoded: ``decode_step``, or ``static:<run>`` (benchmarks and tests)."""
    return _PATHS.get(model)
