"""scripts/induction_check.py: its sequences bind each query to the value after that key, and bad input fails."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("induction_check", REPO / "scripts" / "induction_check.py")
ic = importlib.util.module_from_spec(spec)
sys.modules["induction_check"] = ic
spec.loader.exec_module(ic)


@pytest.mark.parametrize("bos,sep", [(False, False), (True, False), (False, True), (True, True)])
def test_every_answer_is_the_value_that_follows_its_key_in_the_pairs(bos, sep):
    x, y = ic.recall_batch(np.random.default_rng(0), 50, pairs=6, queries=3, bos=bos, sep=sep)
    start = int(bos) + 12 + int(sep)
    assert x.shape == y.shape == (50, start + 6)
    assert ((y != ic.IGNORE_INDEX).sum(1) == 3).all()
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        pairs = row_x[int(bos) : int(bos) + 12].reshape(6, 2)
        keys, values = pairs[:, 0], pairs[:, 1]
        assert len(set(keys)) == 6 and ((1 <= keys) & (keys <= ic.N_KEYS)).all()
        assert ((ic.VALUE0 <= values) & (values < ic.BOS_ID)).all()
        assert (row_x[0] == ic.BOS_ID) == bos and (row_x[start - 1] == ic.SEP_ID) == sep
        asked = row_x[start::2]
        assert len(set(asked)) == 3 and set(asked) <= set(keys)
        want = {k: v for k, v in zip(keys, values, strict=True)}
        assert list(row_y[start::2]) == [want[k] for k in asked]  # the answer's target sits at its query
        assert list(row_x[start + 1 :: 2]) == [want[k] for k in asked]
        assert (np.delete(row_y, np.arange(start, len(row_y), 2)) == ic.IGNORE_INDEX).all()


def test_the_check_runs_and_bad_input_fails_in_one_line(capsys):
    assert ic.main(["--steps", "2", "--every", "1", "--pairs", "2", "--queries", "2", "--", "pos=alibi"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pos=alibi, 2 layers, d_model 128") and "not reached in 2 steps" in out
    assert "picking any value of the sequence scores 0.550" in out  # 1/2 + (1/2)(1/10): values repeat
    assert len([line for line in out.splitlines() if line.strip().split()[0].isdigit()]) == 2
    by_query = out.splitlines()[-1]
    assert by_query.startswith("held-out accuracy by query") and len(by_query.split(":")[1].split()) == 2
    for argv, message in ((["--queries", "3", "--pairs", "2"], "--queries=3 must be in 1..2"),
                          (["--", "model.d_modl=3"], "do not make a train.py config")):
        with pytest.raises(SystemExit) as e:
            ic.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err
