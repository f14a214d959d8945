"""Virtual Token Counter (Sheng et al., OSDI 2024), as the artifact's `vtc_req_queue.py` implements it.

Each user has a counter of weighted service: `w_in` per input token, charged at admission, and `w_out` per output
token, charged as it is decoded, both divided by the user's weight. The backlogged user with the smallest counter goes
next. When a user's queue goes from empty to non-empty its counter is lifted to the smallest counter among the other
backlogged users or, when nobody waits, to the counter of the user whose queue emptied last, so idle time is not
banked as credit. The artifact omits the second case; the paper's Algorithm 2 has it, and without it a user who
joins an idle queue keeps all the credit of its idle time (tests/test_policies.py shows the bound break).

With an output predictor this is the artifact's VTC_predict / VTC_oracle: the predicted output is charged at
admission, tokens past the prediction are charged as they come, and an over-prediction is refunded at finish.
Without one it is plain VTC (a prediction of zero output reduces to exactly the same charges).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import islice
from typing import Iterable, Sequence

from equinox_ray.fairness.pools import PoolView, least_loaded
from equinox_ray.fairness.policy import Policy
from equinox_ray.fairness.prediction import Outcome, Prediction, Predictor
from equinox_ray.fairness.request import Request, User


PREDICT_BATCH = 128  # waiting requests predicted together when one needs a prediction


class VTC(Policy):
    durable = ("served",)
    name = "vtc"

    def __init__(
        self,
        users: Iterable[User] = (),
        *,
        input_weight: float = 1.0,
        output_weight: float = 2.0,
        predictor: Predictor | None = None,
    ) -> None:
        if input_weight < 0 or output_weight < 0:
            raise ValueError("token weights must be >= 0")
        super().__init__(users)
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.predictor = predictor
        self.served: dict[str, float] = defaultdict(float)
        self._prepaid_output: dict[str, float] = {}
        self._predicted: dict[str, dict[str, Prediction]] = {}  # request id -> pool -> prediction, until its grant
        self._unpredicted: dict[str, Request] = {}  # waiting requests not predicted yet, oldest first
        if predictor is not None:
            self.name = "vtc-predict"

    def key(self, user: str) -> float:
        return self.served[user]

    def counters(self, user: str) -> dict[str, float]:
        return {"service": self.served[user]}

    def on_backlogged(self, user: str) -> None:
        floor = self.lift_floor(user)
        if floor is not None:
            self.lift(user, floor)

    def lift(self, user: str, floor: float) -> None:
        self.served[user] = max(self.served[user], floor)

    def submit(self, request: Request, now: float) -> None:
        super().submit(request, now)
        if self.predictor is not None:
            self._unpredicted[request.id] = request

    def prepare(self, requests: Sequence[Request], pools: Sequence[PoolView]) -> None:
        """Predict each new request on every pool whose context it fits, in one batch (one call into the experts
        for a whole controller update). A grant uses these predictions, made when the request was queued; a
        request not prepared is predicted when a decision first needs it."""
        if self.predictor is None:
            return
        self._predict_all(requests, pools)

    def predictions(self, request: Request, pools: Sequence[PoolView]) -> dict[str, Prediction]:
        """The request's prediction on each pool: the one made when it was queued, else a new one. A new one comes
        in a batch with the oldest waiting requests not yet predicted: one call into the experts costs about as
        much for a hundred rows as for one, and under overload those requests are the next to be granted."""
        known = self._predicted.get(request.id, {})
        if any(p.name not in known for p in pools):
            self._unpredicted.pop(request.id, None)
            others = list(islice(self._unpredicted.values(), PREDICT_BATCH - 1))
            self._predict_all([request, *others], pools)
        return {p.name: self._predicted[request.id][p.name] for p in pools}

    def _predict_all(self, requests: Sequence[Request], pools: Sequence[PoolView]) -> None:
        items = [(r, p) for r in requests for p in pools
                 if r.kv_demand <= p.max_request_tokens and p.name not in self._predicted.get(r.id, {})]
        for (request, pool), prediction in zip(items, self.predictor.predict_batch(items)):
            self._predicted.setdefault(request.id, {})[pool.name] = prediction
        for request in requests:
            self._unpredicted.pop(request.id, None)

    def predict(self, request: Request, pool: PoolView) -> Prediction | None:
        return None if self.predictor is None else self.predictions(request, [pool])[pool.name]

    def choose_pool(self, request: Request, candidates: Sequence[PoolView],
                    pools: Sequence[PoolView]) -> tuple[PoolView, Prediction | None]:
        pool = least_loaded(candidates)
        return pool, self.predict(request, pool)

    def on_cancel(self, request: Request) -> None:
        self._predicted.pop(request.id, None)
        self._unpredicted.pop(request.id, None)
        if self.predictor is not None:
            self.predictor.forget(request.id)

    def on_admit(self, request: Request, pool: PoolView, prediction: Prediction | None, now: float) -> None:
        self._predicted.pop(request.id, None)
        self._unpredicted.pop(request.id, None)
        prepaid = 0.0 if prediction is None else min(float(request.max_tokens), max(0.0, prediction.output_tokens))
        self._prepaid_output[request.id] = prepaid
        cost = self.input_weight * request.prompt_tokens + self.output_weight * prepaid
        self.served[request.user] += cost / self.weight(request.user)

    def on_output(self, request: Request, new_tokens: int) -> None:
        prepaid = self._prepaid_output[request.id]
        total = request.served_output_tokens
        beyond = max(0.0, total - prepaid) - max(0.0, total - new_tokens - prepaid)
        if beyond:
            self.served[request.user] += self.output_weight * beyond / self.weight(request.user)

    def on_finish(self, request: Request, outcome: Outcome, now: float) -> None:
        prepaid = self._prepaid_output.pop(request.id)
        unused = prepaid - request.served_output_tokens
        if unused > 0:
            self.served[request.user] -= self.output_weight * unused / self.weight(request.user)
        if self.predictor is not None:
            self.predictor.observe(outcome)
