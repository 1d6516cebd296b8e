"""BOIL (Oh, Yoo, Kim, Yun 2021, "BOIL: Towards Representation Change for Few-shot Learning",
ICLR 2021).

"Body Only update in Inner Loop": the opposite of ANIL. The inner loop adapts every body
parameter (conv and batch-norm weights) and freezes the head (head inner learning rate 0);
the head is meta-learned in the outer loop only. One hook on MAML (`adapted_keys`).

Hyperparameters (published_hyperparameters.csv, from HJ-Yoo/BOIL main.py + run_4conv.sh and
LibFewShot's reproduce/BOIL configs): miniImageNet Conv-4 64 filters, body inner lr 0.5, head 0,
1 inner step at train and at test, meta-batch 4, Adam 1e-3, 30000 outer steps (300 x 100
batches). Batch norm uses batch statistics at test (track_running_stats=False), as here.
The paper has no Omniglot experiments: for the Omniglot keys we chose MAML's Omniglot settings
(Finn et al. 2017; inner lr 0.4 / 0.1, steps 1 / 5 at train and 10 at test, meta-batch 32 / 16,
40000 steps), applied to the body only.
"""

from __future__ import annotations

from dataclasses import dataclass

from baselines.anil import HEAD_KEYS
from baselines.maml import MAML


@dataclass
class BOIL(MAML):
    """MAML with the inner loop on the body only; the head is frozen in the inner loop."""

    inner_lr: float = 0.5
    inner_steps: int = 1
    inner_steps_test: int = 1

    def adapted_keys(self) -> list[str]:
        return [k for k in self.meta if k not in HEAD_KEYS]
