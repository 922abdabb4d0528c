"""CUDA RNG states in train states: each rank saves its own device's, and a resume onto another
node layout (8 GPUs per node saved, 4 per node now) restores without an IndexError.

No GPU is needed: torch.cuda's generator functions are replaced by a fake set of devices that
behaves as the real ones do (a device index past the visible count raises IndexError, as
``torch.cuda.default_generators[i]`` would), so the real ``set_rng_state_all`` fails as it would
on the cluster.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pretrain import checkpoint as ckpt


class FakeCudaDevices:
    """``count`` visible devices, the process on device ``current``; each generator state is a
    distinct byte tensor, and every state set is recorded."""

    def __init__(self, count: int, current: int) -> None:
        self.count, self.current = count, current
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        self.set_calls: list[tuple[int, torch.Tensor]] = []

    def _index(self, device) -> int:
        index = self.current if device in (None, "cuda") else int(getattr(device, "index", device))
        if not 0 <= index < self.count:
            raise IndexError(f"tuple index out of range (device {index} of {self.count})")
        return index

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        index = self._index(device)
        self.set_calls.append((index, state.clone()))
        self.states[index] = state.clone()

    def install(self, monkeypatch) -> "FakeCudaDevices":
        for name, value in (("is_available", lambda: True), ("is_initialized", lambda: True),
                            ("device_count", lambda: self.count), ("current_device", lambda: self.current),
                            ("get_rng_state", self.get_rng_state), ("set_rng_state", self.set_rng_state)):
            monkeypatch.setattr(torch.cuda, name, value)
        # the real get/set_rng_state_all call the module-level functions of torch.cuda.random
        monkeypatch.setattr(torch.cuda.random, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda.random, "get_rng_state", self.get_rng_state)
        return self


def _old_train_state_rng(num_devices: int) -> dict:
    """The RNG part of a train state as checkpoints before this change wrote it: every device's
    CUDA state (get_rng_state_all on a node with ``num_devices`` GPUs per process)."""
    state = ckpt.capture_rng_state()
    state["cuda"] = [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(num_devices)]
    return state


def test_a_rank_saves_only_its_own_device_state(monkeypatch):
    fake = FakeCudaDevices(count=8, current=5).install(monkeypatch)
    state = ckpt.capture_rng_state()
    assert isinstance(state["cuda"], torch.Tensor) and torch.equal(state["cuda"], fake.states[5])


def test_own_device_state_restores_on_a_node_with_fewer_gpus(monkeypatch, tmp_path):
    saved_on = FakeCudaDevices(count=8, current=6).install(monkeypatch)  # rank 6 of a 2 x 8 layout
    saved_on.states[6] = torch.arange(16, dtype=torch.uint8)
    path = str(tmp_path / "rank_00006.pt")
    torch.save({"rng": ckpt.capture_rng_state()}, path)
    resumed_on = FakeCudaDevices(count=4, current=2).install(monkeypatch)  # the same rank in 4 x 4
    ckpt.restore_rng_state(ckpt.load_train_state_file(path)["rng"])  # weights_only: a plain tensor
    assert [i for i, _ in resumed_on.set_calls] == [2]
    assert torch.equal(resumed_on.states[2], torch.arange(16, dtype=torch.uint8))


def test_old_checkpoint_with_8_device_states_loads_into_a_process_that_sees_4(monkeypatch):
    old = _old_train_state_rng(8)
    fake = FakeCudaDevices(count=4, current=3).install(monkeypatch)
    with pytest.raises(IndexError):  # what the restore did before: every saved device, by index
        torch.cuda.set_rng_state_all(old["cuda"])
    fake.set_calls.clear()
    ckpt.restore_rng_state(old)
    assert len(fake.set_calls) == 1 and fake.set_calls[0][0] == 3
    assert torch.equal(fake.set_calls[0][1], old["cuda"][3])  # the entry of the current device


def test_old_checkpoint_without_an_entry_for_this_device_warns_and_goes_on(monkeypatch):
    old = _old_train_state_rng(2)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    fake = FakeCudaDevices(count=4, current=3).install(monkeypatch)
    with pytest.warns(UserWarning, match="cover 2 devices, and this process runs on device 3"):
        ckpt.restore_rng_state(old)
    assert fake.set_calls == []
    # the other generators were restored all the same
    assert torch.equal(torch.get_rng_state(), old["torch"])
