"""torch.compile of an adapted model: no graph break added by the layer, eager loss and gradients."""

import pytest
import torch
import torch._dynamo as dynamo
from tiny_models import batch, tiny_gpt2, tiny_llama

from spra_dist import SpraConfig, apply_spra

pytestmark = pytest.mark.slow  # torch.compile: seconds per test


def adapted(build):
    model = apply_spra(build(), SpraConfig(lora_rank=2, seed=11))
    with torch.no_grad():  # non-zero deltas, so the merge inside the op matters
        for name, p in model.named_parameters():
            if name.endswith("spra_values"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def graph_breaks(model, ids, autocast: bool) -> int:
    def loss(input_ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=input_ids, labels=input_ids).loss

    dynamo.reset()
    try:
        return dynamo.explain(loss)(ids).graph_break_count
    finally:
        dynamo.reset()


@pytest.mark.parametrize(("build", "autocast"), [(tiny_llama, False), (tiny_llama, True), (tiny_gpt2, False)],
                         ids=["llama-fp32", "llama-bf16_autocast", "gpt2-fp32"])
def test_no_added_graph_breaks(build, autocast):
    ids = batch()
    base = graph_breaks(build(), ids, autocast)
    assert graph_breaks(adapted(build), ids, autocast) == base


def loss_and_grads(model, run, ids):
    model.zero_grad(set_to_none=True)
    loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_matches_eager():
    """The default backend (inductor): same loss and value gradients as eager, weights untouched."""
    model = adapted(tiny_llama).train()
    ids = batch(seed=1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    eager_loss, eager_grads = loss_and_grads(model, model, ids)
    dynamo.reset()
    compiled = torch.compile(model)
    for _ in range(2):  # the second call runs the cached graph
        loss, grads = loss_and_grads(model, compiled, ids)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == eager_grads.keys() and len(grads) == 14
        for name, g in grads.items():
            scale = eager_grads[name].abs().max()
            torch.testing.assert_close(g, eager_grads[name], rtol=0, atol=1e-5 * scale)
    dynamo.reset()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_compiled_matches_eager_under_autocast():
    """bf16 autocast traced into the graph (aot_eager: the same graph without code generation)."""
    model = adapted(tiny_gpt2).eval()  # eval: no dropout, whose random streams differ under compile
    ids = batch(seed=2)

    def step(run):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = step(model)
    dynamo.reset()
    loss, grads = step(torch.compile(model, backend="aot_eager"))
    dynamo.reset()
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    assert grads.keys() == eager_grads.keys() and len(grads) == 8  # 2 blocks × (c_attn, c_proj, c_fc, mlp c_proj)
    for name, g in grads.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, eager_grads[name], rtol=0, atol=0)
