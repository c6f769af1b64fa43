"""torch.compile: every scheme compiles into one graph (no breaks) and matches eager, forward and backward.

A graph break inside the model made torch 2.13 replay the logits' and qkv's aliases with garbage shapes once
the compiled graphs came from its on-disk cache (the second run of a compiled training crashed), so "no graph
break" is what is checked: ``fullgraph=True`` raises on any.
"""

import pytest
import torch

from roformer.model import ModelConfig, TransformerLM
from roformer.positional import SCHEMES, PosConfig
from roformer.runtime import compile_model

CASES = [(s, "softmax") for s in sorted(SCHEMES)] + [("rope", "linear")]


@pytest.mark.slow
@pytest.mark.parametrize("scheme,attention", CASES)
def test_compiled_model_is_one_graph_and_matches_eager(scheme, attention):
    torch._dynamo.reset()  # each model is a new guard set; without a reset the recompile limit is reached
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=2, d_model=32, attention=attention, linear_chunk=8)
    model = TransformerLM(cfg, PosConfig(name=scheme, max_len=64))
    x = torch.randint(0, 128, (2, 25))
    _, ref = model(x[:, :-1], x[:, 1:])
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    logits, loss = compiled(x[:, :-1], x[:, 1:])
    loss.backward()
    assert logits.shape == (2, 24, 128)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    with torch.inference_mode():  # evaluation on the same compiled module, then training again
        compiled(x[:, :-1])
    _, again = compiled(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scheme,loss_impl", [("rope", "plain"), ("rope", "blocked"), ("alibi", "plain")])
def test_regional_compile_traces_one_block_and_matches_eager(scheme, loss_impl):
    """compile_model(scope=blocks): every block runs the one compiled block graph (a recompile per block would
    defeat the point), the head and loss are compiled apart, the model keeps its state_dict keys, and forward and
    backward equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, n_layer=3, n_head=2, d_model=32)
    model = TransformerLM(cfg, PosConfig(name=scheme, max_len=64))
    model.loss_impl = loss_impl
    keys = list(model.state_dict())
    x = torch.randint(0, 128, (2, 25))
    _, ref = model(x[:, :-1], x[:, 1:])
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.utils.counters.clear()
    compiled = compile_model(model, scope="blocks")
    assert compiled is model and list(model.state_dict()) == keys
    _, loss = compiled(x[:, :-1], x[:, 1:])
    loss.backward()
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["ok"] == 2, dict(frames)  # one block graph, reused by all 3 blocks, and the head
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
