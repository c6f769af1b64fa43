"""What evaluate.py does: checkpoints -> their data with their own tokenizer -> the grid of cells -> result files.

The grid is checkpoint x RoPE scaling method (RoPE checkpoints only) x protocol x length; each cell is scored by
the pure functions of :mod:`roformer.evaluation`. After a checkpoint's cells come the retrieval probes asked for
(``eval.probes``: passkey, copy; :mod:`roformer.probes`), at the same lengths and RoPE scaling methods. The files
are written by :mod:`roformer.reporting` and the dashboard runs by :mod:`roformer.logger`. Every row carries its
checkpoint's identity as fields (:func:`identity`: scheme, scaling, fine-tuned from, seed, ...) and what kind of row
it is; its display name (``variant``) is made once from those fields, and reports group by the fields.

A checkpoint's own corpus is read from the token cache built when it was trained (same tokenizer, so the same
tokens); another corpus, or a training cache that is gone, is tokenized once with the checkpoint's tokenizer into
a cache keyed on it. Every split is opened before scoring starts, so the one progress bar (in input tokens, the
cost of a cell) is the only one on screen while it runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from roformer.checkpoint import (
    CheckpointError,
    configs_from_checkpoint,
    load_checkpoint,
    model_from_checkpoint,
    resolve_checkpoint,
)
from roformer.data import DataConfig, PreparedData, TokenSplit, open_prepared, prepare
from roformer.data import tokenizer as toklib
from roformer.evaluation import (
    EvalSettings,
    Probe,
    Protocol,
    TextCounter,
    cell_cost,
    evaluate_model,
    fixed_documents,
    fixed_target_tokens,
    long_documents,
    stream_targets,
)
from roformer.files import ensure_writable, to_plain
from roformer.logger import LoggerConfig, log_evaluation
from roformer.positional import DEFAULTS, SCHEMES, RopeScaling
from roformer.probes import copy_distances, probe_cost, run_probes
from roformer.reporting import CSV_FIELDS, add_ratios, write_outputs
from roformer.runtime import keep_freed_memory, resolve_device
from roformer.tasks import checkpoint_bins, format_rows, is_task, score_task

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What evaluate.py scores. The scoring settings live in ``eval`` (roformer.evaluation.EvalSettings)."""

    # a checkpoint file, a run folder, a sweep folder, or a list of those
    ckpt: Any = None
    # which checkpoint of a run folder: last or best
    which: str = "last"
    eval: EvalSettings = field(default_factory=EvalSettings)
    # another corpus to score; None: each checkpoint's own corpus (always with the checkpoint's tokenizer)
    data: DataConfig | None = None
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(job_type="eval"))

    def __post_init__(self) -> None:
        if self.ckpt in (None, "", []):
            raise ValueError("ckpt is required: ckpt=RUN_FOLDER, ckpt=FILE.pt, ckpt=[A,B] or ckpt=SWEEP_FOLDER")
        if not isinstance(self.ckpt, str):
            self.ckpt = [str(c) for c in self.ckpt]
        if self.which not in ("last", "best"):
            raise ValueError(f"which={self.which!r} must be last or best")


def find_checkpoints(spec, which: str = "last") -> list[Path]:
    """A checkpoint file, a run folder, or a sweep folder (every run under it), or a list of those."""
    if spec is None or spec == "" or spec == []:
        raise CheckpointError("no checkpoint given: pass ckpt=PATH, ckpt=[PATH,PATH] or ckpt=SWEEP_FOLDER")
    items = [spec] if isinstance(spec, str | Path) else list(spec)
    name = f"{which}.pt"
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir() and not (p / "checkpoints" / name).is_file() and not (p / name).is_file():
            runs = sorted(q for q in p.rglob(f"checkpoints/{name}") if q.is_file())
            if not runs:
                raise CheckpointError(f"{p} holds no run with checkpoints/{name}; give a checkpoint, run or sweep")
            found += runs
        elif p.is_dir():
            found.append(p / "checkpoints" / name if (p / "checkpoints" / name).is_file() else p / name)
        else:
            found.append(resolve_checkpoint(p))
    return list(dict.fromkeys(found))


def _label(path: Path, taken: set[str], scheme: str) -> str:
    """The run folder's name (a sweep job's overrides, e.g. pos=rope,seed=0), made unique."""
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    base = run.name if run.name and "=" in run.name else scheme
    label, i = base, 1
    while label in taken:
        i += 1
        label = f"{base}#{i}"
    taken.add(label)
    return label


def _tokenizer_file(tok_json: str, cache_dir: str) -> str:
    """The checkpoint's tokenizer as a file (the token cache is keyed on it), written once per tokenizer."""
    h = toklib.tokenizer_hash(tok_json)
    path = Path(cache_dir) / "tokenizers" / f"{h[:16]}.json"
    if not path.exists():
        ensure_writable(path.parent, "data.cache_dir")
        toklib.save(toklib.from_json(tok_json), path)
    return str(path)


def load_split(data_cfg: DataConfig, tok_json: str, split: str, progress: bool):
    """The split tokenized with exactly the checkpoint's tokenizer.

    The cache `prepare(data_cfg)` would use (for a checkpoint's own corpus: the one built when it was trained) is
    opened as it is when its tokenizer is the checkpoint's; otherwise the split is tokenized with the checkpoint's
    tokenizer into a cache keyed on it (built once, then reused).
    """
    want = toklib.tokenizer_hash(tok_json)
    cfg = data_cfg
    data = open_prepared(cfg)
    if data is not None and data.tokenizer_hash == want:
        log.info("using the %s token cache at %s (the checkpoint's tokenizer)", cfg.name, data.cache_path)
    else:
        cfg = replace(data_cfg, tokenizer_path=_tokenizer_file(tok_json, data_cfg.cache_dir))
        data = prepare(cfg, progress=progress)
    if data.tokenizer_hash != want:
        raise ValueError(
            f"the data's tokenizer ({data.tokenizer_hash[:12]}) does not match the checkpoint's ({want[:12]}); "
            "delete the token cache folder and run again"
        )
    if split not in data.splits:
        raise ValueError(f"eval.split={split!r} is not a split of data={cfg.name}; choose one of {list(data.splits)}")
    return data, data.splits[split]


@dataclass
class Plan:
    """One checkpoint's share of the grid."""

    path: Path
    ckpt: dict
    label: str
    train_len: int
    lengths: list[int]
    scalings: list[RopeScaling]
    table: int | None  # the positions the scheme has (learned absolute), None: any length

    @property
    def n_cells(self) -> int:
        return len(self.lengths) * len(self.scalings)


def plan(cfg: EvalConfig) -> list[Plan]:
    """Read (and so validate) every checkpoint before any work, and decide its lengths and scaling methods."""
    s = cfg.eval
    paths = find_checkpoints(cfg.ckpt, cfg.which)
    plans, taken = [], set()
    for p in paths:
        ck = load_checkpoint(p)
        train_len = int(ck["train_cfg"]["trainer"]["seq_len"])
        lengths = s.lengths_for(train_len)
        if s.stride and s.stride > min(lengths):
            raise ValueError(f"eval.stride={s.stride} is larger than the length {min(lengths)}; lower eval.stride")
        pos_cfg = configs_from_checkpoint(ck)[1]
        # a checkpoint trained with a scaling (fine-tuned context extension) is scored as trained only
        zero_shot = pos_cfg.supports_scaling and pos_cfg.scaling == RopeScaling.none
        scalings = s.rope_scaling if zero_shot else [RopeScaling.none]
        label = _label(p, taken, pos_cfg.name)
        plans.append(Plan(p, ck, label, train_len, lengths, scalings, table=pos_cfg.max_positions))
    return plans


@dataclass
class Share:
    """What one checkpoint's cells read: its split, the stretch and documents scored, each cell's cost."""

    data_cfg: DataConfig
    data: PreparedData
    split: TokenSplit
    docs: list[np.ndarray]  # the split's documents
    n_targets: int  # M: targets of every nonoverlapping/sliding cell
    target_tokens: int  # K: final tokens of each fixed_target document
    n_fixed_docs: int  # fixed_target documents scored
    n_long_docs: int  # documents long enough for the largest length
    costs: dict[tuple[str, int], int]  # (protocol, length) -> input tokens read, per RoPE scaling method
    probe_cost: int = 0  # input tokens the probes read, about, per RoPE scaling method


def share_of(pl: Plan, data_cfg: DataConfig, data: PreparedData, split: TokenSplit, s: EvalSettings) -> Share:
    """What the settings `s` make one checkpoint's cells read of its split (the rules are evaluation.py's)."""
    stream, docs = np.asarray(split.tokens), list(split.documents())
    n_targets = stream_targets(s, len(stream), pl.lengths)
    fixed = fixed_documents(docs, pl.lengths, s)
    costs = {(p.value, L): 0 if pl.table is not None and L > pl.table else
             cell_cost(p, L, n_targets=n_targets, stride=s.stride, n_docs=len(fixed))
             for p in s.protocols for L in pl.lengths}  # fmt: skip
    return Share(data_cfg, data, split, docs, n_targets=n_targets, target_tokens=fixed_target_tokens(s, pl.lengths),
                 n_fixed_docs=len(fixed), n_long_docs=len(long_documents(docs, max(pl.lengths))), costs=costs,
                 probe_cost=probe_cost(s, pl.lengths, pl.train_len, pl.table))


def _values(xs) -> str:
    return "/".join(f"{x:,}" for x in sorted(set(xs)))


def describe(plans: list[Plan], shares: list[Share], s: EvalSettings) -> str:
    """Two lines for people: what will be scored, and how to score everything."""
    n_cells = sum(pl.n_cells for pl in plans) * len(s.protocols)
    shapes = {(len(pl.lengths), len(pl.scalings)) for pl in plans}
    if len(shapes) == 1:
        n_len, n_sc = shapes.pop()
        grid = f"{n_len} lengths x {len(s.protocols)} protocols" + (f" x {n_sc} RoPE scalings" if n_sc > 1 else "")
        what = f"{len(plans)} checkpoint{'s' if len(plans) > 1 else ''} x {grid} = {n_cells} cells"
    else:
        what = f"{len(plans)} checkpoints, {n_cells} cells"
    streams = [p.value for p in s.protocols if p != Protocol.fixed_target]
    per_cell = []
    if streams:
        per_cell.append(f"{_values(sh.n_targets for sh in shares)} tokens ({', '.join(streams)})")
    if Protocol.fixed_target in s.protocols:
        per_cell.append(f"the last {_values(sh.target_tokens for sh in shares)} tokens of "
                        f"{_values(sh.n_fixed_docs for sh in shares)} documents (fixed_target)")
    lines = [f"scoring {what}; per cell: {' and '.join(per_cell)}"]
    capped = []
    if streams and any(sh.n_targets < len(sh.split) - 1 for sh in shares):
        capped.append(f"{_values(sh.n_targets for sh in shares)} of its {_values(len(sh.split) - 1 for sh in shares)} "
                      "tokens (eval.max_tokens)")
    if Protocol.fixed_target in s.protocols and any(sh.n_fixed_docs < sh.n_long_docs for sh in shares):
        capped.append(f"{_values(sh.n_fixed_docs for sh in shares)} of its {_values(sh.n_long_docs for sh in shares)} "
                      "documents long enough for the largest length (eval.max_docs)")
    if capped:
        lines.append(f"that is part of the {s.split} split: {' and '.join(capped)}; "
                     "to score all of it: eval.max_tokens=0 eval.max_docs=0")
    else:
        lines.append(f"that is all of the {s.split} split")
    if s.probes:
        lines.append(describe_probes(plans, s))
    return "\n".join(lines)


def describe_probes(plans: list[Plan], s: EvalSettings) -> str:
    """One line: the probes each checkpoint (and RoPE scaling method) gets after its perplexity cells."""
    parts = []
    for probe in s.probes:
        if probe == Probe.passkey:
            n_len = _values(len(pl.lengths) for pl in plans)
            parts.append(f"passkey at {n_len} lengths x {len(s.probe_depths)} depths x {s.probe_trials} keys")
        else:
            ds = {d for pl in plans for d in copy_distances(pl.train_len, pl.lengths)}
            parts.append(f"copy of {s.copy_span} tokens at {len(ds)} distances ({min(ds)}..{max(ds)}) x "
                         f"{s.probe_trials} spans")
    return f"then the probes (eval.probe_seed={s.probe_seed}): {'; '.join(parts)}"


def describe_tasks(plans: list[Plan], s: EvalSettings) -> str:
    """One line: the task checkpoints to score, and how."""
    tasks = ", ".join(dict.fromkeys(pl.ckpt["data_cfg"]["task"] for pl in plans))
    n = len(plans)
    return (f"scoring {n} task checkpoint{'s' if n > 1 else ''} ({tasks}): exact match of greedy decoding on "
            f"{s.task_examples} examples per length bin (eval.task_examples)")


@dataclass(frozen=True)
class Identity:
    """What a checkpoint's model is, as fields read from its config: what result rows carry and reports group by.
    The display name (:meth:`name`) is made from these once and never parsed back."""

    scheme: str  # pos.name
    attention: str = "softmax"  # model.attention: softmax | linear
    table_multiple: float | None = None  # a learned table's size / the training length; None: not a table
    scale_embeddings: bool = False  # pos.scale_embeddings (fairseq's sinusoidal)
    randomized: bool = False  # randomized positions (pos.randomized_max, where the scheme reads it)
    rope_base: float | None = None  # RoPE's pos.base where it is not the default; None: the default
    train_scaling: str = "none"  # pos.scaling as trained (a scaling fine-tuned with, mostly)
    init_from: str | None = None  # trainer.init_from: the checkpoint this one was fine-tuned from
    seed: int | None = None

    @property
    def fine_tuned(self) -> bool:
        return self.init_from is not None

    @property
    def ft_method(self) -> str | None:
        """How a fine-tuned checkpoint's context was extended: its RoPE scaling (pi, yarn, ...), abf (a larger base,
        no scaling) or none (plain); None when it was not fine-tuned."""
        if not self.fine_tuned:
            return None
        return self.train_scaling if self.train_scaling != "none" else "abf" if self.rope_base is not None else "none"

    def name(self, family: bool = False) -> str:
        """The display name: the scheme, then what sets it apart from the scheme's plain form (see variant_name).
        ``family``: the name of the family it is shown beside, without the tags of the scheme's own name
        (``-fairseq``, ``-32L``, and ``-ft`` when nothing follows the scheme)."""
        head = self.scheme
        if self.scale_embeddings and not family:
            head += "-fairseq"
        if self.table_multiple is not None and self.table_multiple != 1 and not family:
            head += f"-{self.table_multiple:g}L"
        parts = ["rand"] if self.randomized else []
        if self.rope_base is not None:  # ABF: a larger base, set at init_from
            parts.append("abf" if self.fine_tuned else f"base{self.rope_base:g}")
        if self.attention == "linear":
            parts.append("linear")
        if self.train_scaling != "none":
            parts.append(self.train_scaling)
        if self.fine_tuned and parts:
            parts[-1] += "-ft"
        elif self.fine_tuned and not family:
            head += "-ft"
        return "+".join([head, *parts])

    def fields(self) -> dict:
        """A checkpoint record's fields: ``variant`` (display), ``family`` and every field of the identity."""
        return {"variant": self.name(), "family": self.name(family=True), **asdict(self),
                "fine_tuned": self.fine_tuned, "ft_method": self.ft_method}

    def row(self, scaling: RopeScaling = RopeScaling.none, bca: bool = False) -> dict:
        """A result row's fields, scored with the zero-shot ``scaling`` (and BCA): :meth:`fields` with the scaling
        in ``variant`` and ``family``, ``base_variant`` (the variant without the scaling), ``rope_scaling``, ``bca``."""
        bca_tag = "+bca" if bca else ""
        tail = ("" if scaling == RopeScaling.none else f"+{scaling.value}") + bca_tag
        out = self.fields()
        return {**out, "variant": out["variant"] + tail, "family": out["family"] + tail,
                "base_variant": out["variant"] + bca_tag, "rope_scaling": scaling.value, "bca": bca}


def identity(ck: dict, train_len: int) -> Identity:
    """A checkpoint's :class:`Identity` from its config (``train_len``: its training length)."""
    pos_cfg = configs_from_checkpoint(ck)[1]
    scheme = SCHEMES[pos_cfg.name]
    table = scheme.max_positions(replace(pos_cfg, randomized_max=0))  # a learned table's size, not a draw's range
    changed_base = scheme.supports_scaling and pos_cfg.base != DEFAULTS["base"]
    return Identity(
        scheme=pos_cfg.name, attention=ck["model_cfg"].get("attention", "softmax"),
        table_multiple=None if table is None else table / train_len, scale_embeddings=bool(pos_cfg.scale_embeddings),
        randomized=bool(pos_cfg.randomized_max and "randomized_max" in scheme.options),
        rope_base=float(pos_cfg.base) if changed_base else None, train_scaling=pos_cfg.scaling.value,
        init_from=str(ck["train_cfg"]["trainer"].get("init_from") or "") or None, seed=ck["train_cfg"].get("seed"))


def variant_name(ck: dict, train_len: int) -> str:
    """What a study calls a checkpoint's model, from its config: the scheme, then what sets it apart from the
    scheme's plain form. ``rope+linear`` (linear attention), ``sinusoidal-fairseq`` (pos.scale_embeddings),
    ``learned-32L`` (a table of 32 x the training length), ``rope+rand`` (randomized positions), ``rope+pi-ft``
    (fine-tuned from another checkpoint with PI scaling), ``rope+abf-ft`` (fine-tuned with a larger base, ABF),
    ``rope-ft`` (fine-tuned without either). Evaluation appends a zero-shot scaling: ``rope+yarn``. A display name
    only: reports group by the fields of :func:`identity`."""
    return identity(ck, train_len).name()


def _checkpoint_record(pl: Plan, data_cfg: DataConfig, train_len: int, **extra) -> dict:
    """A checkpoint's entry in ``results["checkpoints"]``: where it is, its identity fields, its configs, and
    ``extra`` (a corpus checkpoint's split size, a task checkpoint's task)."""
    ck = pl.ckpt
    return {
        "label": pl.label,
        "path": str(pl.path),
        **identity(ck, pl.train_len).fields(),
        "train_len": train_len,
        "step": ck.get("step"),
        "tokens_seen": ck.get("tokens_seen"),
        "group": (ck["train_cfg"].get("logger") or {}).get("group"),
        "config": {"model": ck["model_cfg"], "pos": ck["pos_cfg"], "train": ck["train_cfg"]},
        "data": to_plain(data_cfg),
        **extra,
    }


def _score_checkpoint(pl: Plan, sh: Share, s: EvalSettings, device, on_cell, results: dict, on_probe=None) -> None:
    """Every cell of one checkpoint into ``results`` (rows and per-position curves), then its probes' rows."""
    model = model_from_checkpoint(pl.ckpt).to(device)
    counter = TextCounter.from_tokenizer(sh.data.tokenizer)
    bca = s.bca and "bca_len" in model.pos.options and model.pos.cfg.bca_len == 0
    if bca:  # the model is this function's own: setting its scheme's option changes nothing else
        model.pos.cfg.bca_len = pl.train_len + pl.train_len % 2
    ident = identity(pl.ckpt, pl.train_len)
    fields = {sc: {"label": pl.label, **ident.row(sc, bca), "train_len": pl.train_len} for sc in pl.scalings}
    with torch.inference_mode():
        for scaling, ids in fields.items():
            cells, per_pos = evaluate_model(model, stream=np.asarray(sh.split.tokens), docs=sh.docs,
                                            lengths=pl.lengths, settings=s, scaling=scaling, train_len=pl.train_len,
                                            counter=counter, device=device, on_cell=on_cell)
            results["results"] += [{**ids, "kind": "perplexity", **c.as_dict()} for c in cells]
            if per_pos:
                L = max(per_pos)
                results["per_position"].append({"label": pl.label, "variant": ids["variant"],
                                                "rope_scaling": scaling.value, "length": L, "mean_loss": per_pos[L]})
    for scaling, ids in fields.items() if s.probes else ():
        cells = run_probes(model, tok=sh.data.tokenizer, eod_id=sh.data.eod_id, stream=np.asarray(sh.split.tokens),
                           lengths=pl.lengths, train_len=pl.train_len, settings=s, scaling=scaling, device=device,
                           on_cell=on_probe)
        results["probes"] += [{**ids, "kind": "probe", **c.as_dict()} for c in cells]


def _score_task_checkpoint(pl: Plan, s: EvalSettings, device, results: dict) -> None:
    """A checkpoint trained on an algorithmic task (data=task): greedy exact match per length bin, in the task's own
    unit, on examples regenerated from its data config (no perplexity: a window of prompts and answers means
    nothing). Scored as trained, without RoPE scalings; a row's ``length`` is its bin's upper bound."""
    dc = DataConfig(**pl.ckpt["data_cfg"])
    model = model_from_checkpoint(pl.ckpt).to(device)
    ident, ck = identity(pl.ckpt, pl.train_len), pl.ckpt
    results["checkpoints"].append(_checkpoint_record(pl, dc, dc.task_max_len, task=dc.task))
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
        rows = score_task(model, toklib.from_json(ck["tokenizer_json"]), dc.task, checkpoint_bins(dc),
                          n_per_bin=s.task_examples, seed=dc.task_seed, device=device)
    for r in rows:
        results["tasks"].append({"label": pl.label, **ident.row(), "task": dc.task, "train_len": dc.task_max_len,
                                 "kind": "task", "metric": "exact_match", "bin_lo": r["bin"][0],
                                 "bin_hi": r["bin"][1], "length": r["bin"][1], "value": r["accuracy"], "n": r["n"],
                                 "n_correct": r["n_correct"], "max_tokens": r["max_tokens"]})
    log.info("task checkpoint %s, exact match of greedy decoding per length bin:\n%s", pl.label, format_rows(rows))


def _score_plans(plans: list[Plan], shares: list[Share], s: EvalSettings, device, results: dict) -> None:
    """The perplexity cells and probes of every (corpus) checkpoint, under one progress bar."""
    n_cells = sum(pl.n_cells for pl in plans) * len(s.protocols)
    total = sum((sum(sh.costs.values()) + sh.probe_cost) * len(pl.scalings)
                for pl, sh in zip(plans, shares, strict=True))
    # one bar over every cell, in input tokens read, so that its rate and ETA hold across cells of unequal cost:
    # a sliding cell reads about twice what a nonoverlapping one does, a fixed_target cell grows with its length
    bar = tqdm(total=total, desc="evaluate", unit="tok", unit_scale=True, disable=not s.progress,
               dynamic_ncols=True)
    t_start, done = time.perf_counter(), 0
    for i, (pl, sh) in enumerate(zip(plans, shares, strict=True)):
        record = _checkpoint_record(pl, sh.data_cfg, pl.train_len, split_tokens=int(len(sh.split.tokens)),
                                    split_docs=sh.split.n_docs)
        results["checkpoints"].append(record)

        def on_cell(cell, pl=pl, sh=sh):
            nonlocal done
            done += 1
            bar.set_postfix_str(f"{pl.label}, cell {done}/{n_cells}", refresh=False)
            bar.update(sh.costs[(cell.protocol, cell.length)])

        def on_probe(tokens, pl=pl):
            bar.set_postfix_str(f"{pl.label}, probes", refresh=False)
            bar.update(tokens)

        _score_checkpoint(pl, sh, s, device, on_cell, results, on_probe)
        if not s.progress:  # a line per checkpoint, so that a long evaluation shows it is moving
            log.info("checkpoint %d/%d (%s) scored: %d of %d cells, %.0f s", i + 1, len(plans), pl.label,
                     len(results["results"]), n_cells, time.perf_counter() - t_start)  # fmt: skip
    bar.close()


def run_evaluation(cfg: EvalConfig, out_dir: Path) -> dict:
    """Score every checkpoint x RoPE scaling x protocol x length; write the result files; return the results."""
    s = cfg.eval
    device = resolve_device("auto", "eval.device") if s.device == "auto" else torch.device(s.device)
    if device.type == "cpu":
        keep_freed_memory()  # see roformer/runtime.py
    plans = plan(cfg)
    task_plans = [pl for pl in plans if is_task(DataConfig(**pl.ckpt["data_cfg"]))]  # scored by exact match
    plans = [pl for pl in plans if pl not in task_plans]
    loaded: dict = {}  # (data config, tokenizer) -> (data, split): checkpoints of one sweep share their split
    shares = []
    for pl in plans:
        data_cfg = cfg.data if cfg.data is not None else DataConfig(**pl.ckpt["data_cfg"])
        key = (repr(data_cfg), pl.ckpt["tokenizer_json"])
        if key not in loaded:
            loaded[key] = load_split(data_cfg, pl.ckpt["tokenizer_json"], s.split, s.progress)
        shares.append(share_of(pl, data_cfg, *loaded[key], s))
    results = {"format": {"name": "roformer-eval", "version": 1}, "settings": to_plain(s), "checkpoints": [],
               "results": [], "per_position": [], "probes": [], "tasks": []}
    if task_plans:
        log.info(describe_tasks(task_plans, s))
    for pl in task_plans:
        _score_task_checkpoint(pl, s, device, results)
    if plans:  # task checkpoints alone: no perplexity grid to describe, no bar
        for line in describe(plans, shares, s).splitlines():
            log.info(line)
        _score_plans(plans, shares, s, device, results)
    add_ratios(results["results"])
    write_outputs(results, out_dir)
    log_evaluation(results, cfg.logger, out_dir, CSV_FIELDS)
    return results
