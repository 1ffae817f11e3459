"""The resumable, rank-aware batch loader (`gpt2.loader`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2.errors import UserError
from gpt2.loader import (
    Layout,
    Permutation,
    TrainBatches,
    WindowSequence,
    fixed_batches,
    grouped,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 65537])
def test_permutation_is_a_bijection(n):
    image = Permutation(n, key=12345)(np.arange(n))
    assert np.array_equal(np.sort(image), np.arange(n))


def test_permutations_differ_by_key_and_look_shuffled():
    a = Permutation(10_000, key=1)(np.arange(10_000))
    b = Permutation(10_000, key=2)(np.arange(10_000))
    assert not np.array_equal(a, b)
    # Far from the identity: few fixed points, neighbours scattered.
    assert (a == np.arange(10_000)).sum() < 20
    assert np.abs(np.diff(a)).mean() > 1000


def test_every_window_once_per_epoch_and_never_across_arrays():
    arrays = [np.arange(0, 50, dtype=np.uint16), np.arange(1000, 1020, dtype=np.uint16)]
    seq = WindowSequence(arrays, block_size=8, seed=3)
    assert seq.n_windows == (50 - 8) + (20 - 8)
    for epoch in range(3):
        x, y = seq.batch(epoch * seq.n_windows, seq.n_windows)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        windows = torch.cat([x, y[:, -1:]], dim=1)  # (n, 9)
        # Consecutive ids inside one array: a window never mixes the two arrays.
        assert bool(((windows[:, 1:] - windows[:, :-1]) == 1).all())
        starts = sorted(windows[:, 0].tolist())
        assert starts == list(range(0, 42)) + list(range(1000, 1012))
    first, second = seq.window_ids(0, seq.n_windows), seq.window_ids(seq.n_windows, seq.n_windows)
    assert not np.array_equal(first, second)  # each epoch in a new order


def test_too_short_data_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than one window of block_size \\+ 1 = 9 tokens"):
        WindowSequence(
            [np.arange(8, dtype=np.uint16)], block_size=8, seed=0, name="the train split"
        )


def test_two_ranks_read_what_one_process_accumulating_two_micro_steps_reads():
    seq = WindowSequence([np.arange(5000, dtype=np.uint16)], block_size=16, seed=7)
    single = TrainBatches(seq, Layout(batch_size=4, accum_steps=2))
    ranks = [TrainBatches(seq, Layout(batch_size=4, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):
        micro = single.next_step()
        for r, loader in enumerate(ranks):
            ((x, y),) = loader.next_step()
            assert torch.equal(x, micro[r][0]) and torch.equal(y, micro[r][1])
    assert single.position == ranks[0].position == ranks[1].position == 5 * 8


def test_position_restores_exactly_and_reports_changed_data():
    seq = WindowSequence([np.arange(3000, dtype=np.uint16)], block_size=16, seed=1)
    a = TrainBatches(seq, Layout(batch_size=3, accum_steps=2))
    for _ in range(7):
        a.next_step()
    state = a.state_dict()
    expected = [a.next_step() for _ in range(3)]
    b = TrainBatches(seq, Layout(batch_size=3, accum_steps=2))
    assert b.load_state_dict(state) == []
    for want in expected:
        for (x1, y1), (x2, y2) in zip(want, b.next_step(), strict=True):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = TrainBatches(WindowSequence([np.arange(2000, dtype=np.uint16)], 16, 1), Layout(3))
    assert other.load_state_dict(state) == ["n_windows 2984 -> 1984"]


def test_fixed_batches_split_across_ranks():
    seq = WindowSequence([np.arange(3000, dtype=np.uint16)], block_size=16, seed=2)
    whole = fixed_batches(seq, 4, 6)
    parts = [fixed_batches(seq, 4, 6, rank=r, world_size=2) for r in range(2)]
    for r in range(2):  # rank r gets batches r, r + 2, r + 4
        assert len(parts[r]) == 3
        for i, (x, y) in enumerate(parts[r]):
            assert torch.equal(x, whole[2 * i + r][0]) and torch.equal(y, whole[2 * i + r][1])


def test_grouped_batches_are_the_same_rows_in_the_same_order():
    seq = WindowSequence([np.arange(3000, dtype=np.uint16)], block_size=16, seed=2)
    batches = fixed_batches(seq, 4, 7)
    assert grouped(batches, 1) is batches
    groups = grouped(batches, 3)
    assert [x.shape[0] for x, _ in groups] == [12, 12, 4]  # 7 batches of 4 rows: 3 + 3 + 1
    for part in (0, 1):
        assert torch.equal(
            torch.cat([g[part] for g in groups]), torch.cat([b[part] for b in batches])
        )
