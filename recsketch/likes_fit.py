"""The hybrid's likes half kept across days: ALS's fit, worked forward until the likes drift.

An ALS refit moves every model's factors, so the hybrid lists of every model change and a day
costs a pass over the whole catalogue (the bounded scan: N² × f products). Recommenders that
serve a factor model every day fit it now and then and fold new items in between: a new
model's factors are ALS's own half-step for it (``recalculate_item``: the least-squares item
factor given the fitted users' factors), a new user's likewise from the models they liked, and
every other model keeps its factors to the bit. The served likes rows then change only for the
day's new models, so the hybrid lists are worked forward like the visual ones
(``similarity.refresh_top_k``), exactly for those rows.

The fit is redone when its likes are stale: when the likes changed (added or gone) by more
than ``RECSKETCH_ALS_REFIT_DRIFT`` of those it saw, or it is older than
``RECSKETCH_ALS_REFIT_DAYS``, or evaluate chose other ALS parameters, or another backbone
made the lists. The likes it saw are kept as 64-bit hashes of (user, model), so the drift is
counted exactly, not guessed from like counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse

from recsketch import storage
from recsketch.contracts import TopK
from recsketch.hybrid import DEFAULT_REGULARIZATION, fit_als, whitening
from recsketch.likes import like_hashes, names_and_codes
from recsketch.storage import Location

LATEST_FILE = "hybrid-latest.npz"  # in the backbone's features folder, beside the visual latest lists


def like_keys(likes: pd.DataFrame) -> np.ndarray:
    """The sorted unique 64-bit hashes of a (mid, uid) frame's likes (each name hashed once)."""
    mixed = like_hashes(likes)
    mixed.sort()  # then the runs' firsts: np.unique (numpy 2.4) took 2.1 s on 2 M keys here, this 0.03 s
    return mixed[np.r_[True, mixed[1:] != mixed[:-1]]] if len(mixed) else mixed


def liked_models(likes: pd.DataFrame) -> set[str]:
    """The models a (mid, uid) frame has a like of."""
    names, codes = names_and_codes(likes["mid"])
    return {names[code] for code in np.flatnonzero(np.bincount(codes, minlength=len(names)))}


def drift(fitted: np.ndarray, now: np.ndarray) -> float:
    """Likes added or gone since the fit, as a share of the likes it saw (sorted unique keys)."""
    common = len(np.intersect1d(fitted, now, assume_unique=True))
    return (len(fitted) + len(now) - 2 * common) / max(1, len(fitted))


@dataclass(frozen=True)
class LikesFit:
    """ALS's factors of the run's models (``mids``, the lists' order) and users, the whitening
    that turns item factors into likes rows (frozen at the fit), and what the fit saw."""

    mids: list[str]
    item_factors: np.ndarray  # float32 [n, f]: ALS's own (raw)
    rows: np.ndarray  # float32 [n, f]: the likes rows served (hybrid.likes_rows, the fit's whitening)
    users: list[str]
    user_factors: np.ndarray  # float32 [u, f]
    transform: np.ndarray  # float32 [f, f]: rows = item_factors @ transform
    params: dict[str, float]  # the ALS parameters fitted with
    keys: np.ndarray  # uint64: the likes the fit saw (like_keys)
    fitted_at: float  # UNIX time of the fit
    folded: int = 0  # models folded in since the fit

    def write(self, path: Location, **extra: np.ndarray) -> None:
        meta = json.dumps({"params": self.params, "fitted_at": self.fitted_at, "folded": self.folded})
        storage.save_arrays(path, {"mids": storage.text_array(self.mids), "item_factors": self.item_factors,
                                   "rows": self.rows, "users": storage.text_array(self.users),
                                   "user_factors": self.user_factors, "transform": self.transform, "keys": self.keys,
                                   "meta": np.array(meta), **extra})

    @classmethod
    def from_arrays(cls, data: dict[str, np.ndarray]) -> LikesFit:
        meta = json.loads(str(data["meta"]))
        return cls(storage.texts(data["mids"]), data["item_factors"], data["rows"], storage.texts(data["users"]),
                   data["user_factors"], data["transform"], dict(meta["params"]), data["keys"],
                   float(meta["fitted_at"]), int(meta.get("folded", 0)))

    @classmethod
    def read(cls, path: Location) -> LikesFit | None:
        try:
            return cls.from_arrays(storage.load_npz(path))
        except (OSError, KeyError, ValueError, EOFError):
            return None

    @property
    def regularization(self) -> float:
        return float(self.params.get("regularization", DEFAULT_REGULARIZATION))


@dataclass(frozen=True)
class HybridLatest:
    """The last exact hybrid lists with the fit that made them and the weight they blend at:
    the base of the next day's refresh (``recsketch.stages.neighbours``)."""

    fit: LikesFit
    topk: TopK
    cf_weight: float

    def write(self, path: Location) -> None:
        self.fit.write(path, indices=self.topk.indices.astype(np.int32), scores=self.topk.scores,
                       versions=storage.text_array(self.topk.versions), backbone_key=np.array(self.topk.backbone_key),
                       cf_weight=np.array(self.cf_weight))

    def same_as_stored(self, path: Location) -> bool:
        """Whether ``path`` already holds this state (the same lists, fit and weight): read
        without the factors, so an unchanged day does not write ~1 GB again at 1 M models."""
        try:
            data = storage.load_npz(path, ("mids", "versions", "meta", "cf_weight", "backbone_key", "indices",
                                           "scores"))
        except (OSError, KeyError, ValueError, EOFError):
            return False
        meta = json.loads(str(data["meta"]))
        same_fit = float(meta["fitted_at"]) == self.fit.fitted_at and int(meta.get("folded", 0)) == self.fit.folded
        return (same_fit and float(data["cf_weight"]) == self.cf_weight
                and str(data["backbone_key"]) == self.topk.backbone_key
                and storage.texts(data["mids"]) == self.topk.mids
                and storage.texts(data["versions"]) == self.topk.versions
                and np.array_equal(data["indices"], self.topk.indices)
                and np.array_equal(data["scores"], self.topk.scores))

    @classmethod
    def read(cls, path: Location) -> HybridLatest | None:
        """The stored state, or None when there is none (or it is unreadable: the day refits)."""
        try:
            data = storage.load_npz(path)
            fit = LikesFit.from_arrays(data)
            topk = TopK(fit.mids, data["indices"].astype(np.int64), data["scores"], str(data["backbone_key"]),
                        storage.texts(data["versions"]))
            return cls(fit, topk, float(data["cf_weight"]))
        except (OSError, KeyError, ValueError, EOFError):
            return None


def refit_reason(latest: HybridLatest | None, params: dict[str, float], backbone_key: str, changed: float,
                 max_drift: float, max_age_days: float, now: float | None = None) -> str | None:
    """Why the likes must be fitted again today (None: the kept fit is worked forward);
    ``changed``: the share of the fit's likes changed since (:func:`drift`)."""
    if latest is None:
        return "no earlier fit is kept"
    if latest.topk.backbone_key != backbone_key:
        return "the kept fit's lists are of another backbone"
    if {name: float(value) for name, value in latest.fit.params.items()} != \
            {name: float(value) for name, value in params.items()}:
        return (f"evaluate chose other ALS parameters ({params or 'defaults'}; "
                f"the fit had {latest.fit.params or 'defaults'})")
    age_days = ((time.time() if now is None else now) - latest.fit.fitted_at) / 86_400
    if age_days > max_age_days:
        return f"the fit is {age_days:.1f} days old (RECSKETCH_ALS_REFIT_DAYS={max_age_days:g})"
    if changed > max_drift:
        return f"{changed:.2%} of its likes changed (RECSKETCH_ALS_REFIT_DRIFT={max_drift:g})"
    return None


def _codes(likes: pd.DataFrame, mids: list[str], users: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(user codes, model codes, the users) of the likes of ``mids``: the given users first, in
    their order, then the others sorted."""
    mid_names, mid_codes = names_and_codes(likes["mid"])
    items = pd.Index(mids).get_indexer(mid_names)[mid_codes]
    keep = items >= 0
    uid_names, uid_codes = names_and_codes(likes["uid"])
    present = np.flatnonzero(np.bincount(uid_codes[keep], minlength=len(uid_names)))
    known = pd.Index(users).get_indexer([uid_names[code] for code in present])
    others = sorted(uid_names[code] for code, at in zip(present, known, strict=True) if at < 0)
    slot = np.full(len(uid_names), -1, dtype=np.int64)
    slot[present] = np.where(known >= 0, known, len(users) + pd.Index(others).get_indexer(
        [uid_names[code] for code in present]))
    return slot[uid_codes[keep]], items[keep].astype(np.int64), list(users) + others


def _binary(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sparse.csr_matrix:
    """A 0/1 float32 matrix with a one at each (row, col), repeats counted once."""
    matrix = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def fit(likes: pd.DataFrame, mids: list[str], params: dict[str, float], threads: int,
        keys: np.ndarray | None = None) -> LikesFit:
    """ALS on the run's likes, its item factors in ``mids`` order (fitted in sorted order: ALS's
    start depends on the item order, so a fit does not depend on the lists' order); ``keys``:
    the likes' :func:`like_keys`, if made already."""
    canonical = sorted(mids)
    user_codes, item_codes, users = _codes(likes, canonical, [])
    matrix = _binary(user_codes, item_codes, (len(users), len(canonical)))
    user_factors, fitted = fit_als(matrix, threads=threads, **params)  # type: ignore[arg-type]
    position = pd.Index(canonical).get_indexer(mids)
    item_factors = np.ascontiguousarray(fitted[position], dtype=np.float32)
    transform = whitening(item_factors, float(params.get("regularization", DEFAULT_REGULARIZATION)))
    return LikesFit(list(mids), item_factors, item_factors @ transform, users,
                    np.ascontiguousarray(user_factors, dtype=np.float32), transform, dict(params),
                    like_keys(likes) if keys is None else keys,
                    time.time())


def fold_in(kept: LikesFit, likes: pd.DataFrame, mids: list[str], threads: int) -> tuple[LikesFit, np.ndarray]:
    """The kept fit worked forward onto today's models ``mids``: a model it has keeps its factors
    and likes row to the bit; a new one gets ALS's half-step given the users' factors (a new
    user's own half-step first, from the models the fit has). Returns (the fit in ``mids``
    order, which rows are new). The fit's users, transform, parameters and keys stay."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    params = kept.params
    old = pd.Index(kept.mids).get_indexer(mids)
    new = old < 0
    f = kept.item_factors.shape[1]
    item_factors = np.zeros((len(mids), f), dtype=np.float32)
    rows = np.zeros((len(mids), f), dtype=np.float32)
    item_factors[~new], rows[~new] = kept.item_factors[old[~new]], kept.rows[old[~new]]
    users, user_factors = kept.users, kept.user_factors
    if new.any():
        user_codes, item_codes, users = _codes(likes, mids, kept.users)
        model = AlternatingLeastSquares(factors=f, regularization=kept.regularization,
                                        alpha=float(params.get("alpha", 2.0)), num_threads=threads)
        model.item_factors = kept.item_factors
        fresh_users = np.arange(len(kept.users), len(users))
        added = np.zeros((len(fresh_users), f), dtype=np.float32)
        with threadpool_limits(1, "blas"):
            if len(fresh_users):  # their likes on the models the fit has, in the fit's item order
                on_old = (user_codes >= len(kept.users)) & ~new[item_codes]
                user_items = _binary(user_codes[on_old] - len(kept.users), old[item_codes[on_old]],
                                     (len(fresh_users), len(kept.mids)))
                model.user_factors = kept.user_factors
                added = np.asarray(model.recalculate_user(np.arange(len(fresh_users)), user_items), np.float32)
            user_factors = np.concatenate([kept.user_factors, added]) if len(added) else kept.user_factors
            model.user_factors = user_factors
            new_rows = np.flatnonzero(new)
            on_new = new[item_codes]
            slot = np.searchsorted(new_rows, item_codes[on_new])
            item_users = _binary(slot, user_codes[on_new], (len(new_rows), len(users)))
            folded = np.asarray(model.recalculate_item(np.arange(len(new_rows)), item_users), np.float32)
        item_factors[new] = folded
        rows[new] = folded @ kept.transform
    worked = LikesFit(list(mids), item_factors, rows, users, np.ascontiguousarray(user_factors, np.float32),
                      kept.transform, params, kept.keys, kept.fitted_at, kept.folded + int(new.sum()))
    return worked, new
