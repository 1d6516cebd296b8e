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

Backbones: any (the body is every backbone parameter). `miniimagenet-resnet12`: the repository's
ResNet-12 commands (run_resnet.sh), written for CIFAR-FS; see its note.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

from bench.api import Preset, with_meta_dataset
from baselines.core import HEAD_KEYS
from baselines.maml import MAML


REGISTER = {"boil": "BOIL"}

_OH = "Oh, Yoo, Kim, Yun. BOIL: Towards Representation Change for Few-shot Learning. ICLR 2021"


@dataclass
class BOIL(MAML):
    """MAML with the inner loop on the body only; the head is frozen in the inner loop."""

    STEP_TRACE: ClassVar[bool] = True  # adaptation ends in one inner_loop call (test-time steps axis)
    PARALLEL_TASKS: ClassVar[bool] = True
    TASK_BATCHED: ClassVar[bool] = True
    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        **{key: replace(MAML.PRESETS[key], paper=_OH,
                        note="Omniglot is not in the paper: MAML's Omniglot settings, our choice")
           for key in ("omniglot-5w", "omniglot-20w")},
        "miniimagenet": Preset(dict(inner_lr=0.5, inner_steps=1, inner_steps_test=1, meta_batch=4, outer_lr=1e-3,
                                    hidden=64), 30000, _OH, "HJ-Yoo/BOIL", "main.py + run_4conv.sh",
                               "also LibFewShot reproduce/BOIL: body lr 0.5, head 0, 1 step, meta-batch 4, Conv-4 64, "
                               "30000 steps (300 x 100 batches)"),
        "miniimagenet-resnet12": Preset(dict(inner_lr=0.3, inner_steps=1, inner_steps_test=1, meta_batch=4,
                                             outer_lr=6e-4, backbone="resnet12"), 30000, _OH, "HJ-Yoo/BOIL",
                                        "run_resnet.sh",
                                        "the repository's ResNet-12 commands (--model=resnet --blocks-type=a: every "
                                        "skip connection kept): extractor step size 0.3, classifier 0, meta lr 6e-4, "
                                        "with main.py's 1 inner step and 4 tasks per update; written for CIFAR-FS "
                                        "5-shot, taken for miniImageNet and 30000 updates (as the Conv-4 preset) by "
                                        "us, not confirmed from the paper; not taken over: the paper's disconnection "
                                        "trick (blocks-type b: no skip connection in the last block); widths: "
                                        "MetaOptNet's 64-160-320-640, not checked against the reference's model.py"),
    })

    inner_lr: float = 0.5
    inner_steps: int = 1
    inner_steps_test: int = 1

    def adapted_keys(self) -> list[str]:
        return [k for k in self.meta if k not in HEAD_KEYS]
