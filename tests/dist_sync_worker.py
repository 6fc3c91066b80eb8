"""Worker for tests/test_weight_sync.py: rank 0 trains a tiny SpaRA Llama and sends its values after each step, rank 1
is a rollout holding the plain base; each scenario named on the command line runs in turn in the same group.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        tests/dist_sync_worker.py fp32 bf16 fsdp2 dense seed lora_rank

fp32 / bf16 / fsdp2 / dense: N AdamW steps, a sync after each; the rollout's logits and every tensor compared with
the trainer's merged model (fsdp2: the trainer's values sharded by FSDP2 over a mesh of rank 0 alone; dense: the
output head trained densely too, and sent whole). seed /
lora_rank: a rollout asking for other masks; both ranks must raise. Each rank writes one JSON line per scenario
(``RESULT {...}``) and each error on stderr as ``rank R SCENARIO error: ...``.
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from tiny_models import batch, tiny_llama

from spra_dist import SpraConfig, apply_spra, merge_adapter
from spra_dist.adapters.merge import merged_named_parameters
from spra_dist.distributed.comm import CommCounter
from spra_dist.distributed.group import exit_rank, init_distributed, shutdown
from spra_dist.distributed.sync import WeightReceiver, WeightSender
from spra_dist.distributed.tensors import full_tensor

STEPS = 3
CFG = SpraConfig(lora_rank=2, seed=1234)
DENSE = SpraConfig(lora_rank=2, seed=1234, trainable_modules=["lm_head"])  # the head trained densely, sent whole
OTHER = {"seed": SpraConfig(lora_rank=2, seed=99), "lora_rank": SpraConfig(lora_rank=4, seed=1234)}

rank, _ = init_distributed()
counter = CommCounter.install()
trainer_group = dist.new_group([0])  # apply_spra's seed agreement and the FSDP2 mesh: the trainer alone
IDS = batch(seed=3)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trainer(scenario: str) -> dict:
    model = apply_spra(tiny_llama(), DENSE if scenario == "dense" else CFG, group=trainer_group)
    if scenario == "fsdp2":
        from torch.distributed.device_mesh import DeviceMesh

        from spra_dist.distributed.fsdp import apply_fsdp2

        apply_fsdp2(model, mesh=DeviceMesh.from_group(trainer_group, "cpu"), mp_policy=None)
    sender = WeightSender(model, src=0)
    layout = sender.handshake()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    per_sync = []
    for _ in range(STEPS):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        counter.reset()
        sent = sender.send()
        per_sync.append({"sent": sent, "bytes": counter.bytes_by_op(), "calls": dict(counter.calls)})
    model.eval()
    reference = plain_reference(model, scenario)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    got: list = [None, None]
    dist.all_gather_object(got, None)
    rollout = got[1]
    return {"k_total": layout.k_total, "nbytes": layout.nbytes, "dtype": str(layout.dtype), "per_sync": per_sync,
            "logits_equal": torch.equal(logits(reference), rollout["logits"]),
            "trained": not torch.equal(logits(reference), logits(tiny_llama().to(reference.dtype))),
            "tensors_equal": sorted(expected) == sorted(rollout["params"])
            and all(torch.equal(expected[n], rollout["params"][n]) for n in expected)}


def plain_reference(model, scenario: str):
    """The trainer's merged model as a plain HF model: in fp32, or with its weights and values in bf16."""
    if scenario == "fsdp2":  # the values gathered from their shards onto an unsharded copy
        copy_ = apply_spra(tiny_llama(), CFG, group=trainer_group)
        shards = {n: p for n, p in model.named_parameters() if n.endswith("spra_values")}
        for n, p in copy_.named_parameters():
            if n in shards:
                p.data.copy_(full_tensor(shards[n]))
        model = copy_
    if scenario in ("fp32", "dense"):  # merged_named_parameters gives the same tensors, one at a time
        merged = dict(merged_named_parameters(model))
    reference = merge_adapter(copy.deepcopy(model).to(torch.bfloat16 if scenario == "bf16" else torch.float32))
    if scenario in ("fp32", "dense"):
        assert all(torch.equal(merged[n], p) for n, p in reference.named_parameters())
    return reference


def rollout(scenario: str) -> None:
    base = tiny_llama()  # the same base weights: the same seed
    if scenario == "bf16":
        base = base.to(torch.bfloat16)
    receiver = WeightReceiver(base, config=OTHER.get(scenario), src=0)
    layout = receiver.handshake()
    for _ in range(STEPS):
        receiver.receive()
    state = {"logits": logits(base), "params": {n: p.detach().clone() for n, p in base.named_parameters()}}
    dist.all_gather_object([None, None], state)
    receiver.restore()  # every adapted weight is the base again, bit for bit (a dense head keeps what it got)
    fresh = dict(tiny_llama().to(base.dtype).named_parameters())
    dense = {name for name, _ in layout.dense}
    assert all(torch.equal(p, fresh[n]) for n, p in base.named_parameters() if n not in dense)


failed = False
for scenario in sys.argv[1:]:
    try:
        if rank == 0:
            result = trainer(scenario)
        else:
            rollout(scenario)
            result = {}
        # One write per line: the two ranks share the pipes, unbuffered (a line under 4 KB is written whole).
        sys.stdout.write("RESULT " + json.dumps({"rank": rank, "scenario": scenario, **result}) + "\n")
        sys.stdout.flush()
    except ValueError as e:
        sys.stderr.write(f"rank {rank} {scenario} error: {e}\n")
        sys.stderr.flush()
        failed = True
shutdown()
exit_rank(3 if failed else 0)  # the trainer's group and the FSDP2 mesh keep gloo threads: skip finalization
