"""ANIL (Raghu, Raghu, Bengio, Vinyals 2020, "Rapid Learning or Feature Reuse? Towards Understanding
the Effectiveness of MAML", ICLR 2020).

"Almost No Inner Loop": MAML whose inner loop adapts only the final linear layer (the head);
the body is meta-learned in the outer loop only. Everything else is MAML (one class, one hook:
`adapted_keys`), so second/first order is MAML's `first_order` flag.

Hyperparameters: the paper uses "the same architecture and setup as Finn et al." (ANIL Sec. 4),
so the registry reuses MAML's per-family defaults (Omniglot 5-way inner lr 0.4, 1 step at train,
10 at test, meta-batch 32; 20-way 0.1, 5 steps, meta-batch 16; miniImageNet 0.01, 5 steps,
meta-batch 4, Conv-4 32) and MAML's numbers of outer steps; the ANIL appendix with its exact
values was not retrieved (published_hyperparameters.csv: "App. B not retrieved").

Backbones: any (the head is the linear layer after the backbone's features). The paper has no
ResNet-12 settings (Conv-4, as MAML): a ResNet run takes the benchmark's preset with the backbone
set over it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

from bench.api import Preset, with_meta_dataset
from baselines.core import HEAD_KEYS
from baselines.maml import FINN_KEYS, MAML


REGISTER = {"anil": "ANIL"}


@dataclass
class ANIL(MAML):
    """MAML with the inner loop on the head only (`head.weight`, `head.bias`)."""

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True
    TASK_BATCHED: ClassVar[bool] = True
    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        key: replace(p, paper="Raghu, Raghu, Bengio, Vinyals. Rapid Learning or Feature Reuse? Towards Understanding "
                              "the Effectiveness of MAML. ICLR 2020",
                     note="inner loop on the head only; 'same architecture and setup as Finn et al.': MAML's "
                          "hyperparameters and steps (the appendix with exact values was not retrieved)")
        for key, p in MAML.PRESETS.items() if key in FINN_KEYS})

    def adapted_keys(self) -> list[str]:
        return [k for k in self.meta if k in HEAD_KEYS]
