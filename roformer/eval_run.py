"""What evaluate.py does: checkpoints -> their data with their own tokenizer -> the grid of cells -> result files.

The grid is checkpoint x RoPE scaling method (RoPE checkpoints only) x protocol x length; each cell is scored by
the pure functions of :mod:`roformer.evaluation`. After a checkpoint's cells come the retrieval probes asked for
(``eval.probes``: passkey, copy; :mod:`roformer.probes`), at the same lengths and RoPE scaling methods. The files
are written by :mod:`roformer.reporting` and the dashboard runs by :mod:`roformer.logger`.

A checkpoint's own corpus is read from the token cache built when it was trained (same tokenizer, so the same
tokens); another corpus, or a training cache that is gone, is tokenized once with the checkpoint's tokenizer into
a cache keyed on it. Every split is opened before scoring starts, so the one progress bar (in input tokens, the
cost of a cell) is the only one on screen while it runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
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


def variant_name(ck: dict, train_len: int) -> str:
    """What a study calls a checkpoint's model, from its config: the scheme, then what sets it apart from the
    scheme's plain form. ``rope+linear`` (linear attention), ``sinusoidal-fairseq`` (pos.scale_embeddings),
    ``learned-32L`` (a table of 32 x the training length), ``rope+rand`` (randomized positions), ``rope+pi-ft``
    (fine-tuned from another checkpoint with PI scaling), ``rope+abf-ft`` (fine-tuned with a larger base, ABF),
    ``rope-ft`` (fine-tuned without either). Evaluation appends a zero-shot scaling: ``rope+yarn``."""
    pos_cfg = configs_from_checkpoint(ck)[1]
    name, scheme = pos_cfg.name, SCHEMES[pos_cfg.name]
    if pos_cfg.scale_embeddings:
        name += "-fairseq"
    table = scheme.max_positions(replace(pos_cfg, randomized_max=0))  # a learned table's size, not a draw's range
    if table is not None and table != train_len:
        name += f"-{table / train_len:g}L"
    if pos_cfg.randomized_max and "randomized_max" in scheme.options:
        name += "+rand"
    fine_tuned = bool(ck["train_cfg"]["trainer"].get("init_from"))
    if scheme.supports_scaling and pos_cfg.base != DEFAULTS["base"]:  # ABF: a larger base, set at init_from
        name += "+abf" if fine_tuned else f"+base{pos_cfg.base:g}"
    if ck["model_cfg"].get("attention", "softmax") == "linear":
        name += "+linear"
    if pos_cfg.scaling != RopeScaling.none:
        name += f"+{pos_cfg.scaling.value}"
    if fine_tuned:
        name += "-ft"
    return name


def _checkpoint_record(pl: Plan, data_cfg: DataConfig, stream: np.ndarray, n_docs: int) -> dict:
    ck = pl.ckpt
    attention = ck["model_cfg"].get("attention", "softmax")
    return {
        "label": pl.label,
        "path": str(pl.path),
        "scheme": ck["pos_cfg"]["name"],
        "attention": attention,
        "variant": variant_name(ck, pl.train_len),
        "seed": ck["train_cfg"].get("seed"),
        "train_len": pl.train_len,
        "step": ck.get("step"),
        "tokens_seen": ck.get("tokens_seen"),
        "group": (ck["train_cfg"].get("logger") or {}).get("group"),
        "config": {"model": ck["model_cfg"], "pos": ck["pos_cfg"], "train": ck["train_cfg"]},
        "data": to_plain(data_cfg),
        "split_tokens": int(len(stream)),
        "split_docs": n_docs,
    }


def _score_checkpoint(pl: Plan, record: dict, sh: Share, s: EvalSettings, device, on_cell, results: dict,
                      on_probe=None) -> None:
    """Every cell of one checkpoint into ``results`` (rows and per-position curves), then its probes' rows."""
    model = model_from_checkpoint(pl.ckpt).to(device)
    counter = TextCounter.from_tokenizer(sh.data.tokenizer)
    bca = s.bca and "bca_len" in model.pos.options and model.pos.cfg.bca_len == 0
    if bca:  # the model is this function's own: setting its scheme's option changes nothing else
        model.pos.cfg.bca_len = pl.train_len + pl.train_len % 2
    variants = {sc: record["variant"] + ("" if sc == RopeScaling.none else f"+{sc.value}") + ("+bca" if bca else "")
                for sc in pl.scalings}
    ids = {"label": pl.label, "scheme": record["scheme"]}
    with torch.inference_mode():
        for scaling, variant in variants.items():
            cells, per_pos = evaluate_model(model, stream=np.asarray(sh.split.tokens), docs=sh.docs,
                                            lengths=pl.lengths, settings=s, scaling=scaling, train_len=pl.train_len,
                                            counter=counter, device=device, on_cell=on_cell)
            for c in cells:
                results["results"].append({**ids, "variant": variant, "rope_scaling": scaling.value,
                                           "seed": record["seed"], "train_len": pl.train_len, **c.as_dict()})
            if per_pos:
                L = max(per_pos)
                results["per_position"].append({"label": pl.label, "variant": variant, "rope_scaling": scaling.value,
                                                "length": L, "mean_loss": per_pos[L]})
    for scaling, variant in variants.items() if s.probes else ():
        cells = run_probes(model, tok=sh.data.tokenizer, eod_id=sh.data.eod_id, stream=np.asarray(sh.split.tokens),
                           lengths=pl.lengths, train_len=pl.train_len, settings=s, scaling=scaling, device=device,
                           on_cell=on_probe)
        results["probes"] += [{**ids, "variant": variant, "rope_scaling": scaling.value, "seed": record["seed"],
                               "train_len": pl.train_len, **c.as_dict()} for c in cells]


def _score_task_checkpoint(pl: Plan, s: EvalSettings, device, results: dict) -> None:
    """A checkpoint trained on an algorithmic task (data=task): greedy exact match per length bin, in the task's own
    unit, on examples regenerated from its data config (no perplexity: a window of prompts and answers means
    nothing). Scored as trained, without RoPE scalings."""
    dc = DataConfig(**pl.ckpt["data_cfg"])
    model = model_from_checkpoint(pl.ckpt).to(device)
    ident = {"label": pl.label, "variant": variant_name(pl.ckpt, pl.train_len), "scheme": pl.ckpt["pos_cfg"]["name"],
             "seed": pl.ckpt["train_cfg"].get("seed"), "task": dc.task, "train_len": dc.task_max_len}
    results["checkpoints"].append({**ident, "path": str(pl.path), "step": pl.ckpt.get("step"), "data": to_plain(dc),
                                   "config": {"model": pl.ckpt["model_cfg"], "pos": pl.ckpt["pos_cfg"],
                                              "train": pl.ckpt["train_cfg"]}})
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
        rows = score_task(model, toklib.from_json(pl.ckpt["tokenizer_json"]), dc.task, checkpoint_bins(dc),
                          n_per_bin=s.task_examples, seed=dc.task_seed, device=device)
    for r in rows:
        results["tasks"].append({**ident, "metric": "exact_match", "bin_lo": r["bin"][0], "bin_hi": r["bin"][1],
                                 "value": r["accuracy"], "n": r["n"], "n_correct": r["n_correct"],
                                 "max_tokens": r["max_tokens"]})
    log.info("task checkpoint %s, exact match of greedy decoding per length bin:\n%s", pl.label, format_rows(rows))


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
    for line in describe(plans, shares, s).splitlines():
        log.info(line)
    n_cells = sum(pl.n_cells for pl in plans) * len(s.protocols)
    total = sum((sum(sh.costs.values()) + sh.probe_cost) * len(pl.scalings)
                for pl, sh in zip(plans, shares, strict=True))
    # one bar over every cell, in input tokens read, so that its rate and ETA hold across cells of unequal cost:
    # a sliding cell reads about twice what a nonoverlapping one does, a fixed_target cell grows with its length
    bar = tqdm(total=total, desc="evaluate", unit="tok", unit_scale=True, disable=not s.progress,
               dynamic_ncols=True)
    results = {"format": {"name": "roformer-eval", "version": 1}, "settings": to_plain(s), "checkpoints": [],
               "results": [], "per_position": [], "probes": [], "tasks": []}
    for pl in task_plans:
        _score_task_checkpoint(pl, s, device, results)
    t_start, done = time.perf_counter(), 0
    for i, (pl, sh) in enumerate(zip(plans, shares, strict=True)):
        record = _checkpoint_record(pl, sh.data_cfg, sh.split.tokens, sh.split.n_docs)
        results["checkpoints"].append(record)

        def on_cell(cell, pl=pl, sh=sh):
            nonlocal done
            done += 1
            bar.set_postfix_str(f"{pl.label}, cell {done}/{n_cells}", refresh=False)
            bar.update(sh.costs[(cell.protocol, cell.length)])

        def on_probe(tokens, pl=pl):
            bar.set_postfix_str(f"{pl.label}, probes", refresh=False)
            bar.update(tokens)

        _score_checkpoint(pl, record, sh, s, device, on_cell, results, on_probe)
        if not s.progress:  # a line per checkpoint, so that a long evaluation shows it is moving
            log.info("checkpoint %d/%d (%s) scored: %d of %d cells, %.0f s", i + 1, len(plans), pl.label,
                     len(results["results"]), n_cells, time.perf_counter() - t_start)  # fmt: skip
    bar.close()
    add_ratios(results["results"])
    write_outputs(results, out_dir)
    log_evaluation(results, cfg.logger, out_dir, CSV_FIELDS)
    return results
