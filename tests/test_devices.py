"""Where ``spra train`` computes: the device a config asks for, the backend that goes with it, batches on the
model's device, collectives' tensors on the CPU under gloo. The GPU side runs in tests/test_cuda.py."""

import pytest
import torch
from torch import nn

from spra_dist.distributed.devices import backend_for, collective_device, model_device, to_device, train_device
from spra_dist.train.config import TrainConfig


def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train_device("auto") == train_device("cpu") == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ValueError, match="device=cuda, but torch sees no CUDA GPU.*use device=cpu"):
        train_device("cuda")
    with pytest.raises(ValueError, match="device='gpu' is not one of auto, cpu, cuda"):
        TrainConfig(device="gpu").validate()


def test_auto_picks_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert train_device("auto") == train_device("cuda") == torch.device("cuda", 3)
    assert train_device("cpu") == torch.device("cpu")


def test_batches_follow_the_model_and_collectives_stay_on_the_cpu_under_gloo():
    model = nn.Linear(2, 2, device="meta")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "num_items_in_batch": 5.0}
    moved = to_device(batch, model_device(model))
    assert moved["input_ids"].device.type == "meta" and moved["num_items_in_batch"] == 5.0
    assert batch["input_ids"].device.type == "cpu"  # the caller's batch is left as it was
    assert model_device(nn.ReLU()) == torch.device("cpu") and collective_device() == torch.device("cpu")
