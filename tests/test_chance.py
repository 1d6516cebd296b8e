"""chance: accuracy exactly 1/way on balanced query sets."""

from __future__ import annotations

import math

from baselines.chance import Chance


def test_chance_is_one_over_way(synthetic_set):
    m = Chance().setup(synthetic_set.task_info())
    rows = m.evaluate(synthetic_set.episodes("test", 5))
    assert all(r["accuracy"] == 1 / 5 for r in rows)
    assert all(math.isclose(r["loss"], math.log(5)) for r in rows)
    m.fit(iter(()), 3)
    assert Chance().load_state_dict(m.state_dict()).fit_steps == 3
