"""Tests of data/permutation.py: a seeded bijection whose values are part of every run's data order."""

import numpy as np

from data.permutation import Permutation


def test_permutation_is_a_seeded_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4099):
        p = Permutation(n, seed=7, epoch=2)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))
    # golden values: changing them changes the data order of every existing run (breaks resume)
    assert Permutation(1000, 0, 0)(np.arange(10)).tolist() == [307, 366, 828, 727, 310, 277, 0, 935, 59, 787]
    a, b, c = (Permutation(10_000, s, e)(np.arange(10_000)) for s, e in ((0, 0), (1, 0), (0, 1)))
    assert (a != b).mean() > 0.99 and (a != c).mean() > 0.99
    assert abs(np.corrcoef(np.arange(10_000), a)[0, 1]) < 0.05
