"""`chance`: the floor every method must clear. Predicts uniform logits (accuracy 1/way, loss log(way))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

import torch

from bench.api import Episode, MetaLearner, Predictor, Preset, Tags, TaskInfo


REGISTER = {"chance": "Chance"}


@dataclass
class Chance(MetaLearner):
    """No learning: all-equal logits, so the top prediction is class 0 and accuracy is 1/way."""

    LABEL_PERMUTATION_INVARIANT: ClassVar[bool] = True  # all-equal logits whatever the labels
    PRESETS: ClassVar[Mapping[str, Preset]] = {"*": Preset({}, 0, "uniform prediction (accuracy 1/way)")}

    TAGS = Tags(bn_mode="none", order="none", transductive=False, variable_way=True, deterministic=True)
    # declared conformance-check exceptions (bench/checks.py): reported as "excepted", never hidden
    CHECK_EXCEPTIONS = {
        "check_learns": "the chance floor learns nothing, by design",
        "check_adapt_uses_support": "predicts uniform logits whatever the support set, by design",
    }

    def setup(self, info: TaskInfo) -> "Chance":
        self.info = info
        self.fit_episodes = 0
        self.fit_steps = 0
        return self

    def fit(self, episodes: Iterator[Episode], steps: int) -> "Chance":
        self.fit_steps += steps  # consumes nothing: there is nothing to learn
        return self

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        way = int(support_y.max()) + 1
        return lambda query_x: torch.zeros(len(query_x), way, device=query_x.device)

    def state_dict(self) -> dict[str, Any]:
        return {"method": "Chance", "fit_episodes": self.fit_episodes, "fit_steps": self.fit_steps}

    def load_state_dict(self, state: dict[str, Any]) -> "Chance":
        self.fit_episodes = int(state["fit_episodes"])
        self.fit_steps = int(state["fit_steps"])
        return self
