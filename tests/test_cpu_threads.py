"""The CPU thread governor: fewer threads when other processes take the cores, back up when
they leave, never above the launcher's count, and only after two equal answers."""

from __future__ import annotations

import pytest
import torch

from ffhq_ldm.runtime import CpuThreads


@pytest.mark.parametrize("cores,elsewhere,limit,want", [
    (2, 0.0, 2, 2), (2, 0.4, 2, 2), (2, 0.6, 2, 1), (2, 2.0, 2, 1), (2, 5.0, 2, 1),
    (8, 3.0, 8, 5), (8, 0.0, 4, 4), (8, 7.9, 8, 1),
])
def test_choose_is_free_cores_clamped(cores, elsewhere, limit, want):
    assert CpuThreads.choose(cores, elsewhere, limit) == want


def test_update_follows_the_load_with_two_equal_answers(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        said = []
        gov = CpuThreads("cpu", every_s=0.0, say=said.append)
        gov.cores = 2
        # (wall, machine busy s, own s): each sample 1 s later. Busy elsewhere = machine - own.
        script = iter([(1, 2.0, 0.6), (2, 4.0, 1.2), (3, 5.9, 3.1), (4, 7.8, 5.0), (5, 9.7, 6.9)])
        monkeypatch.setattr(gov, "_sample", lambda: next(script))
        gov._last = (0, 0.0, 0.0)
        assert gov.update() is None and torch.get_num_threads() == 2  # 1.4 elsewhere: pending
        assert gov.update() == 1 and torch.get_num_threads() == 1     # twice: 1 thread
        assert said and "1.4 of 2 cores busy" in said[0]
        assert gov.update() is None                                   # 0.0 elsewhere: pending
        assert gov.update() == 2 and torch.get_num_threads() == 2     # back to the limit
        assert gov.update() is None
        assert not CpuThreads("meta").enabled
    finally:
        torch.set_num_threads(before)
    torch.set_num_threads(1)
    assert not CpuThreads("cpu").enabled  # one thread: nothing to govern
    torch.set_num_threads(before)
