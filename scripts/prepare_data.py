"""Prepare a corpus alone: download, train the tokenizer, tokenize and cache, with the data config of training.

    python scripts/prepare_data.py                                   # WikiText-2 into data/wikitext2/
    python scripts/prepare_data.py data=sotu
    python scripts/prepare_data.py data=wikitext2 data.vocab_size=16384
    python scripts/prepare_data.py data=text_files 'data.train_files=[my/*.txt]'
    python scripts/prepare_data.py data=hub data.hub_path=roneneldan/TinyStories data.test_split=null
    python scripts/prepare_data.py data=task data.task=addition      # counts only: tasks are never cached

Prints the counts per split (documents, source lines, bytes, words, tokens), the cache folder and the time.
A second run with the same settings finds the cache and does no work. Exit codes: 0 done; 2 a usage error (an
unknown key, a bad value, a missing required setting); 1 a failure while preparing (a missing file, a download).
"""

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from roformer.config import Task, launch  # noqa: E402
from roformer.data import TASK, DataConfig, format_counts, prepare  # noqa: E402


@dataclass
class PrepareDataConfig:
    data: DataConfig = field(default_factory=DataConfig)
    progress: bool = True
    """Show tqdm progress bars."""


ConfigStore.instance().store(name="prepare_data_schema", node=PrepareDataConfig)


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare_data")
def main(dcfg: DictConfig) -> None:
    logging.getLogger("roformer").setLevel(logging.INFO)
    with Task(failures=(ValueError, OSError)) as task:  # one line; a bad setting exits 2, a failure 1
        cfg: PrepareDataConfig = task.config(dcfg, OmegaConf.to_object)
        t0 = time.time()
        data = prepare(cfg.data, progress=cfg.progress)
    seconds = time.time() - t0
    print(f"\n{cfg.data.name}: vocab {data.vocab_size:,} (eod id {data.eod_id}, tokenizer {data.tokenizer_hash[:12]}),"
          f" {data.splits['train'].tokens.dtype} ids")
    print(format_counts(data))
    if cfg.data.name == TASK:
        print("cache: none (data=task is generated in memory from data.task_seed whenever it is used)")
    else:
        print(f"cache: {data.cache_path} (counts in meta.json)")
    print(f"time: {seconds:.1f}s")


if __name__ == "__main__":
    launch(main)
