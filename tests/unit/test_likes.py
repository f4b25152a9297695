import random

import pytest

from recsketch.likes import threshold_likes


def brute_force(pairs: set[tuple[str, str]], n: int) -> set[tuple[str, str]]:
    """The definition, literally: drop any pair whose user or model has < n likes, until stable."""
    current = set(pairs)
    while True:
        users: dict[str, int] = {}
        models: dict[str, int] = {}
        for mid, uid in current:
            users[uid] = users.get(uid, 0) + 1
            models[mid] = models.get(mid, 0) + 1
        kept = {(m, u) for m, u in current if users[u] >= n and models[m] >= n}
        if kept == current:
            return kept
        current = kept


def test_hand_checked_cascade() -> None:
    # u1..u3 each like A, B; u3 also likes C. With n=2: C has 1 like -> removed; then u3 still
    # has 2 (A, B) -> stays. D is liked by u4 and u5 only, who like nothing else -> both
    # users have 1 like -> removed, which leaves D with 0.
    pairs = [("A", "u1"), ("B", "u1"), ("A", "u2"), ("B", "u2"), ("A", "u3"), ("B", "u3"), ("C", "u3"),
             ("D", "u4"), ("D", "u5"), ("A", "u1")]  # the last is a duplicate row
    result = threshold_likes(pairs, 2)
    assert sorted(map(tuple, result.likes.to_numpy())) == [
        ("A", "u1"), ("A", "u2"), ("A", "u3"), ("B", "u1"), ("B", "u2"), ("B", "u3")]
    assert result.models == ["A", "B"]
    assert result.likes_before == 9  # duplicates counted once


def test_needs_more_than_one_pass() -> None:
    # removing user u4 (1 like) drops model M to 1 like, which then drops user u1 to 1 like
    pairs = [("M", "u1"), ("M", "u4"), ("N", "u1"), ("N", "u2"), ("O", "u2"), ("O", "u3"), ("N", "u3"),
             ("O", "u1")]
    result = threshold_likes(pairs, 2)
    assert result.iterations >= 2
    assert set(map(tuple, result.likes.to_numpy())) == brute_force(set(pairs), 2)


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_on_random_data(seed: int) -> None:
    rng = random.Random(seed)
    n_models, n_users = rng.randint(1, 40), rng.randint(1, 60)
    pairs = {(f"m{rng.randrange(n_models)}", f"u{rng.randrange(n_users)}") for _ in range(rng.randint(0, 600))}
    minimum = rng.randint(1, 7)
    result = threshold_likes(sorted(pairs), minimum)
    assert set(map(tuple, result.likes.to_numpy())) == brute_force(pairs, minimum)


def test_categorical_input_whose_categories_are_in_another_order() -> None:
    """As read_likes_frame returns them: categories in an order of their own, unused ones too."""
    import pandas as pd

    pairs = [("B", "u1"), ("A", "u1"), ("B", "u2"), ("A", "u2"), ("C", "u2")]
    frame = pd.DataFrame({"mid": pd.Categorical([m for m, _ in pairs], categories=["C", "Z", "B", "A"]),
                          "uid": pd.Categorical([u for _, u in pairs], categories=["u9", "u2", "u1"])})
    result = threshold_likes(frame, 2)
    assert result.models == ["A", "B"]
    assert set(map(tuple, result.likes.to_numpy())) == brute_force(set(pairs), 2)
