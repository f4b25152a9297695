"""Paired comparisons (DESIGN §11): the standard error of a mean of per-user differences, the
one-sided bound the gate refuses on, corrected for several comparisons, and what a choice must
beat to replace yesterday's."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from recsketch.significance import beats, paired


def test_the_bound_is_the_paired_t_bound_and_a_correction_widens_it() -> None:
    rng = np.random.default_rng(0)
    reference = rng.random(40)
    candidate = reference * 0.8 + rng.normal(0, 0.05, 40)
    one = paired(candidate, reference, ratio=0.9)
    differences = candidate - 0.9 * reference
    se = differences.std(ddof=1) / math.sqrt(40)
    assert one.difference == pytest.approx(differences.mean()) and one.se == pytest.approx(se)
    assert one.upper == pytest.approx(differences.mean() + stats.t.ppf(0.95, 39) * se)
    three = paired(candidate, reference, ratio=0.9, comparisons=3)
    assert three.level == pytest.approx(1 - 0.05 / 3) and three.upper > one.upper
    assert "on 40 users" in one.describe() and f"{one.se:.4f}" in one.describe()


def test_noise_alone_is_refused_about_five_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    refused = sum(paired(rng.random(60), rng.random(60)).below for _ in range(2000))
    assert 60 <= refused <= 145  # 5 % of 2,000 is 100; 4.4 standard errors either side
    worse = sum(paired(rng.random(60) * 0.5, rng.random(60), ratio=0.9).below for _ in range(200))
    assert worse >= 190  # a real drop to half is refused nearly always


def test_fewer_than_two_users_refuse_nothing_and_a_choice_must_beat_its_noise() -> None:
    assert not paired(np.array([0.0]), np.array([1.0])).below
    assert not paired(np.zeros(0), np.zeros(0)).below
    rng = np.random.default_rng(2)
    base = rng.random(200)
    assert not beats(base.copy(), base)  # the same: no
    assert beats(base + 0.1, base)  # better for every user: yes
    noisy = base + rng.normal(0.0, 0.3, 200)
    assert beats(noisy, base) == (np.mean(noisy - base) > np.std(noisy - base, ddof=1) / math.sqrt(200))
