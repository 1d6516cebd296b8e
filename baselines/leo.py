"""`leo`: Latent Embedding Optimization (Rusu, Rao, Sygnowski, Vinyals, Pascanu, Osindero, Hadsell,
"Meta-Learning with Latent Embedding Optimization", ICLR 2019).

LEO meta-learns, on the features of a pre-trained and then frozen backbone, a generative model
of a task's linear classifier, and adapts in its low-dimensional latent space:

- encoder: a bias-free linear map of each support feature (dropout first) to `n_latents` codes;
- relation network: a bias-free 3-layer MLP (2 x n_latents units, ReLU between layers) on every
  ordered pair of support codes, averaged over the second element of the pair, then over the
  support examples of each class: per class, the mean and raw scale of a Gaussian over its code;
- the code z is sampled (meta-training) or taken at its mean (test); KL(q(z) || N(0, I)) is the
  one-sample Monte-Carlo estimate of the reference, log q(z) - log p(z) averaged over elements;
- decoder: a bias-free linear map of z to the mean and raw scale of a Gaussian over the class's
  weight vector, sampled at meta-training, its mean at test;
- inner loop: `inner_steps` gradient steps on the codes (learned per-dimension lr, init
  `inner_lr`), the support loss going through the decoder, then `finetune_steps` steps directly
  on the decoded weights (learned per-dimension lr, init `finetune_lr`); its test-time steps
  (`test_steps`) are the two together, numbered consecutively, and the steps axis runs the
  fine-tuning loop on to 2 x (inner_steps + finetune_steps) (`adapt_recorded`);
- outer loss: query cross-entropy + kl_weight * KL + encoder_penalty * mean((stop_grad(z') - z)^2)
  (z' the adapted codes) + l2_penalty * sum(W^2) / 2 over the encoder, relation and decoder
  weights + orthogonality_penalty * mean((C - I)^2), C the correlation matrix of the decoder's
  rows (one per latent dimension); Adam, every meta-gradient clipped by value and then by norm
  (`grad_clip`, `grad_norm_clip`); a non-finite meta-gradient is replaced by that of 1e-4 x the
  L2 term, as in the reference.

What follows google-deepmind/leo (model.py, runner.py, config.py, README.md), beyond the list
above: the features are L2-normalised per example (data.py's tf.nn.l2_normalize of the
embeddings); the Gaussians' scale is std = max(exp(raw) - 1 + offset, 1e-10), offset 0 for the codes
and sqrt(2 / (d + way)) for the weights (the reference's parametrisation, not a log-variance);
every example carries its own copy of its class's code (sampled independently, adapted
separately) and its own decoded weights, and a class's classifier is the mean of its copies, as
the reference's [way, shot, .] tensors (with unequal shots each class simply has as many copies
as examples); dropout (rate `dropout`) on the encoder's input and on the features in every
prediction during meta-training, none at test; second order through both inner loops; bias-free
logits x . w; Glorot-uniform initialisation. Presets: the README's tuned miniImageNet 1-shot
values, config.py's structure (64 latents, 5 + 5 steps, lrs 1.0 / 0.001, meta-batch 12, clips
0.1, 100000 steps).

Our choices, stated: the backbone is Conv-4 (batch norm on the statistics of the batch being
predicted) pre-trained here, not the paper's WRN-28-10 640-d embeddings (the reference ships
pre-computed embeddings and no pre-training code). Like scale-shift, one `fit` stream has two
phases: the first `pretrain_steps` outer steps are finetune's supervised pre-training
(baselines.finetune.pretraining_loss over all training classes, `pretrain_batch` episodes per
step, Adam `pretrain_lr`: finetune's recipe), after which the backbone is frozen and LEO is
meta-learned on its features (computed without a graph). One Adam holds both phases' parameters
in two groups (each phase leaves the other's gradients empty, which Adam skips), and the phase
depends only on the step counter, so fit(a) + fit(b) equals fit(a + b) across the boundary. The
random draws of a meta-training task (dropout, code and weight samples) come from a generator
seeded by (seed, outer step, episode index), so the tasks of a meta-batch can run side by side
and a run resumes exactly; the first fine-tuning gradient is taken with a fresh prediction dropout
mask (the reference reuses the last latent step's loss: the same weights, another mask). Omniglot
is not in the paper: its presets are our choice.

Backbones: any, pre-trained in phase 1 (the paper's features are a WRN-28-10's, not provided here);
no ResNet preset.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F

from bench.api import Episode, Predictor, Preset, Tags, TaskInfo, new_generator, with_meta_dataset
from baselines.core import GradientLearner, Params, conv4_features, inner_loop, step_curve, tracing
from baselines.finetune import pretraining_loss

REGISTER = {"leo": "LEO"}

LATENTS, WEIGHTS, CLASSIFIER = "leo.latents", "leo.weights", "classifier"
"""Keys of the per-task tensors: codes [n, n_latents], decoded weights [n, d] (n support examples),
and the adapted classifier [way, d] that `forward` predicts with."""
REGULARISED = ("enc.weight", "rel0.weight", "rel1.weight", "rel2.weight", "dec.weight")
"""The weights under the L2 penalty (the reference's snt.Linear / MLP regularizers)."""
NOISE_SALT = 3
NAN_FALLBACK = 1e-4
"""A non-finite meta-gradient is replaced by the gradient of NAN_FALLBACK * sum(W^2) / 2 (runner.py)."""

_RUSU = ("Rusu, Rao, Sygnowski, Vinyals, Pascanu, Osindero, Hadsell. Meta-Learning with Latent Embedding "
         "Optimization. ICLR 2019")
# miniImageNet 5-way 1-shot (README table); the 5-shot values are in the preset note
_LEO_MINI_1SHOT = dict(outer_lr=2.739071e-4, l2_penalty=3.623413e-10, orthogonality_penalty=0.188103,
                       dropout=0.307651, kl_weight=0.756143, encoder_penalty=5.756821e-6)
_LEO_CODE = dict(n_latents=64, inner_steps=5, finetune_steps=5, inner_lr=1.0, finetune_lr=0.001, meta_batch=12,
                 grad_clip=0.1, grad_norm_clip=0.1, first_order=False)
_PRETRAIN = dict(pretrain_steps=40000, pretrain_batch=4, pretrain_lr=1e-3)  # finetune's preset
_NOTE = ("LEO on the features of our Conv-4 {hidden} pre-trained in the first 40000 steps (finetune's "
         "pre-training: Adam 1e-3, 4 episodes per step; our choice) instead of the paper's WRN-28-10 640-d "
         "embeddings, then 100000 LEO steps (num_steps_limit); outer lr, dropout and the penalty weights are the "
         "README's tuned miniImageNet 1-shot values (5-shot: outer lr 4.102361e-4, l2 8.540338e-9, orthogonality "
         "1.523998e-3, dropout 0.300299, kl 0.466387, encoder 2.661608e-7); config.py: 64 latents, 5 latent + 5 "
         "finetuning steps, lr inits 1.0 / 0.001, meta-batch 12, clip 0.1 by value and norm")


def glorot(gen: torch.Generator, fan_in: int, fan_out: int) -> torch.Tensor:
    """A Glorot-uniform weight [fan_in, fan_out], U(+-sqrt(6 / (fan_in + fan_out)))."""
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(fan_in, fan_out, generator=gen) * 2 - 1) * bound


LEO_PREFIXES = ("enc.", "rel", "dec.", "lr.")
"""LEO's own parameters (phase 2); every other meta-parameter is the body or the pre-training classifier."""


def is_backbone(key: str) -> bool:
    """Body and pre-training classifier keys (phase 1; frozen in phase 2)."""
    return not key.startswith(LEO_PREFIXES)


def pretrain_logits(p: Mapping[str, torch.Tensor], x: torch.Tensor,
                    features: Callable[..., torch.Tensor] = conv4_features) -> torch.Tensor:
    """Phase 1: logits [N, n_classes] of the body (`features`, Conv-4 by default) and the pre-training classifier."""
    return F.linear(features(p, x), p["pre.weight"], p["pre.bias"])


def embed(p: Mapping[str, torch.Tensor], x: torch.Tensor,
          features: Callable[..., torch.Tensor] = conv4_features) -> torch.Tensor:
    """LEO's input: the body's features of x [N, C, H, W], L2-normalised per example -> [N, d] (data.py)."""
    return F.normalize(features(p, x), dim=-1)


def dropout(x: torch.Tensor, rate: float, gen: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout of x with keep mask drawn from `gen` (identity when gen is None or rate 0)."""
    if gen is None or rate == 0:
        return x
    keep = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device) >= rate
    return x * keep / (1 - rate)


def gaussian(params: torch.Tensor, offset: float, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample (the mean when gen is None) of the Gaussian of params [n, 2m] = [mean, raw scale],
    std = max(exp(raw) - 1 + offset, 1e-10), and the one-sample estimate of KL(q || N(0, I)) (mean over
    elements; 0 without sampling). Returns ([n, m], scalar)."""
    mean, raw = params.chunk(2, dim=-1)
    if gen is None:
        return mean, mean.new_zeros(())
    std = (raw.exp() - (1.0 - offset)).clamp_min(1e-10)
    sample = mean + std * torch.randn(mean.shape, generator=gen, dtype=mean.dtype).to(mean.device)
    log_q = -0.5 * ((sample - mean) / std) ** 2 - std.log()
    log_p = -0.5 * sample ** 2
    return sample, (log_q - log_p).mean()


def class_mean(rows: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Per-class mean of rows [n, m] (onehot [n, way]) -> [way, m]."""
    return onehot.T @ rows / onehot.sum(0).unsqueeze(1)


def orthogonality(w: torch.Tensor) -> torch.Tensor:
    """mean((C - I)^2), C [r, r] the cosine similarities of the rows of w [r, c]."""
    norms = w.norm(dim=1, keepdim=True) + 1e-32
    corr = (w @ w.T) / (norms @ norms.T)
    return (corr - torch.eye(w.shape[0], dtype=w.dtype, device=w.device)).pow(2).mean()


def clip_gradients(params: list[torch.Tensor], value: float, norm: float) -> None:
    """In place: each .grad clamped to [-value, value], then scaled to L2 norm <= norm (tf.clip_by_norm);
    0 turns either off."""
    for p in params:
        if p.grad is None:
            continue
        if value > 0:
            p.grad.clamp_(-value, value)
        if norm > 0:
            p.grad.mul_(norm / torch.clamp_min(p.grad.norm(), norm))


@dataclass
class LEO(GradientLearner):
    """Pre-train Conv-4 (phase 1), then meta-learn LEO's encoder, relation network and decoder on its
    frozen features (phase 2).

    Phase 2: n_latents: code size; inner_steps / inner_lr: the latent inner loop and its lr init;
    finetune_steps / finetune_lr: the weight fine-tuning loop and its lr init (same steps at test);
    dropout, kl_weight, encoder_penalty, l2_penalty, orthogonality_penalty: the regularisers;
    grad_clip / grad_norm_clip: meta-gradient clipping; meta_batch, outer_lr: Adam;
    first_order: detach the inner gradients. Phase 1: pretrain_steps (the split), pretrain_batch
    (episodes per step), pretrain_lr (Adam).
    """

    meta_batch: int = 12
    outer_lr: float = 2.739071e-4
    n_latents: int = 64
    inner_steps: int = 5
    finetune_steps: int = 5
    inner_lr: float = 1.0
    finetune_lr: float = 0.001
    dropout: float = 0.307651
    kl_weight: float = 0.756143
    encoder_penalty: float = 5.756821e-6
    l2_penalty: float = 3.623413e-10
    orthogonality_penalty: float = 0.188103
    grad_clip: float = 0.1
    grad_norm_clip: float = 0.1
    first_order: bool = False
    pretrain_steps: int = 40000
    pretrain_batch: int = 4
    pretrain_lr: float = 1e-3

    LABEL_PERMUTATION_INVARIANT: ClassVar[bool] = True  # per-class codes, pairwise relation net; means at test
    PARALLEL_TASKS: ClassVar[bool] = True  # task_loss only reads self (per-task generators)
    PRESETS: ClassVar[Mapping[str, Preset]] = with_meta_dataset({
        key: Preset({**_LEO_MINI_1SHOT, **_LEO_CODE, **_PRETRAIN, "hidden": hidden}, 140000, _RUSU,
                    "google-deepmind/leo", "config.py (defaults) + README.md (tuned values)",
                    _NOTE.format(hidden=hidden) + extra)
        for key, hidden, extra in (
            ("miniimagenet", 32, ""),
            ("omniglot-5w", 64, "; Omniglot is not in the paper: the miniImageNet 1-shot settings, our choice"),
            ("omniglot-20w", 64, "; Omniglot is not in the paper: the miniImageNet 1-shot settings, our choice"))})

    # conformance suite (bench/checks.py): a phase boundary after 2 steps, so the resume checks
    # (fit(2) + fit(1)) cross it
    CHECK_PARAMS = dict(pretrain_steps=2)

    @property
    def tags(self) -> Tags:
        return Tags(bn_mode="transductive", order="first" if self.first_order else "second", transductive=True,
                    variable_way=True, deterministic=True)

    # --- parameters ---------------------------------------------------------------------
    def init_meta(self, info: TaskInfo, gen: torch.Generator) -> Params:
        """The backbone with the pre-training classifier pre.* [n_classes, d]; encoder enc.weight [d, nz],
        relation rel{0,1,2}.weight [2nz, 2nz], decoder dec.weight [nz, 2d] (Glorot-uniform; [in, out]);
        learned inner lrs lr.latent [nz] and lr.finetune [d] (constants)."""
        p = self.init_net(info, gen, info.n_classes)
        p["pre.weight"], p["pre.bias"] = p.pop("head.weight"), p.pop("head.bias")
        d, nz = p["pre.weight"].shape[1], self.n_latents
        p["enc.weight"] = glorot(gen, d, nz)
        for j in range(3):
            p[f"rel{j}.weight"] = glorot(gen, 2 * nz, 2 * nz)
        p["dec.weight"] = glorot(gen, nz, 2 * d)
        p["lr.latent"] = torch.full((nz,), self.inner_lr)
        p["lr.finetune"] = torch.full((d,), self.finetune_lr)
        return p

    def make_optimizer(self) -> torch.optim.Optimizer:
        """One Adam, two groups: the backbone at pretrain_lr (phase 1), LEO at outer_lr (phase 2)."""
        backbone = [v for k, v in self.meta.items() if is_backbone(k)]
        leo = [v for k, v in self.meta.items() if not is_backbone(k)]
        return torch.optim.Adam([{"params": backbone, "lr": self.pretrain_lr}, {"params": leo, "lr": self.outer_lr}])

    def forward(self, p: Mapping[str, torch.Tensor], x: torch.Tensor, way: int | None = None) -> torch.Tensor:
        """Logits [N, way] of an adapted classifier p[CLASSIFIER] [way, d] on the embeddings of x."""
        w = p[CLASSIFIER]
        return F.linear(embed(p, x, self.net.features), w if way is None else w[:way])

    # --- LEO ----------------------------------------------------------------------------
    def codes(self, p: Mapping[str, torch.Tensor], feats: torch.Tensor, onehot: torch.Tensor,
              gen: torch.Generator | None) -> torch.Tensor:
        """Encoder + relation network: support features [n, d] -> per-example copies of their class's
        Gaussian parameters [n, 2nz]."""
        z = dropout(feats, self.dropout, gen) @ p["enc.weight"]
        n = z.shape[0]
        h = torch.cat([z.unsqueeze(1).expand(n, n, -1), z.unsqueeze(0).expand(n, n, -1)], dim=-1)
        for j in range(3):
            h = h @ p[f"rel{j}.weight"]
            h = F.relu(h) if j < 2 else h
        return onehot @ class_mean(h.mean(dim=1), onehot)

    def decode(self, p: Mapping[str, torch.Tensor], latents: torch.Tensor, way: int,
               gen: torch.Generator | None) -> torch.Tensor:
        """Decoder: codes [n, nz] -> weights [n, d] (sampled with the reference's Glorot std offset)."""
        d = p["dec.weight"].shape[1] // 2
        weights, _ = gaussian(latents @ p["dec.weight"], math.sqrt(2.0 / (d + way)), gen)
        return weights

    def leo(self, p: Mapping[str, torch.Tensor], support: tuple[torch.Tensor, torch.Tensor],
            gen: torch.Generator | None, first_order: bool) -> dict[str, torch.Tensor]:
        """Adapt to support (features [n, d], labels [n]): the latent inner loop, then weight fine-tuning.

        gen None (test): Gaussian means, no dropout. Returns "classifier" [way, d], the codes before
        ("latents") and after ("adapted") the latent inner loop [n, nz], and "kl" (scalar; 0 at test).
        Draw order from gen: encoder dropout, code sample, then per latent step a weight sample and a
        prediction dropout, the final weight sample, a prediction dropout per fine-tuning step."""
        feats, y = support
        way = int(y.max()) + 1
        onehot = F.one_hot(y, way).to(feats.dtype)

        def predict_loss(w: torch.Tensor, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(dropout(x, self.dropout, gen) @ class_mean(w, onehot).T, labels)

        def latent_loss(q: Params, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return predict_loss(self.decode(q, q[LATENTS], way, gen), x, labels)

        start, kl = gaussian(self.codes(p, feats, onehot, gen), 0.0, gen)
        fast = inner_loop(latent_loss, {**p, LATENTS: start}, [LATENTS], support, self.inner_steps,
                          {LATENTS: p["lr.latent"]}, first_order)
        tuned = inner_loop(lambda q, x, labels: predict_loss(q[WEIGHTS], x, labels),
                           {WEIGHTS: self.decode(p, fast[LATENTS], way, gen)}, [WEIGHTS], support,
                           self.finetune_steps, {WEIGHTS: p["lr.finetune"]}, first_order)
        return {"classifier": class_mean(tuned[WEIGHTS], onehot), "latents": start, "adapted": fast[LATENTS],
                "kl": kl}

    def regularisation(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """l2_penalty * sum(W^2) / 2 over REGULARISED + orthogonality_penalty * orthogonality(decoder)."""
        l2 = sum(p[k].pow(2).sum() for k in REGULARISED) / 2
        return self.l2_penalty * l2 + self.orthogonality_penalty * orthogonality(p["dec.weight"])

    # --- training -----------------------------------------------------------------------
    def pretraining(self) -> bool:
        """True while the next outer step belongs to phase 1."""
        return self.fit_steps < self.pretrain_steps

    def episodes_per_step(self) -> int:
        return self.pretrain_batch if self.pretraining() else self.meta_batch

    def task_generator(self, ep: Episode) -> torch.Generator:
        """The generator of one meta-training task's draws: seeded by (seed, outer step, episode index)."""
        return new_generator(self.seed, NOISE_SALT, self.fit_steps, ep.index)

    def task_loss(self, ep: Episode) -> torch.Tensor:
        if self.pretraining():
            return pretraining_loss(functools.partial(pretrain_logits, features=self.net.features), self.meta, ep)
        with torch.no_grad():
            support, query = (embed(self.meta, x, self.net.features) for x in (ep.support_x, ep.query_x))
        gen = self.task_generator(ep)
        out = self.leo(self.meta, (support, ep.support_y), gen, self.first_order)
        loss = F.cross_entropy(dropout(query, self.dropout, gen) @ out["classifier"].T, ep.query_y)
        encoder = (out["adapted"].detach() - out["latents"]).pow(2).mean()  # stop-gradient on the adapted codes
        return loss + self.kl_weight * out["kl"] + self.encoder_penalty * encoder + self.regularisation(self.meta)

    def outer_step(self, batch: list[Episode]) -> None:
        """Phase 1: the plain Adam step. Phase 2: the reference's non-finite fallback and clipping first."""
        if self.pretraining():
            return super().outer_step(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_tasks(batch)
        leo = {k: v for k, v in self.meta.items() if not is_backbone(k)}
        if not all(torch.isfinite(v.grad).all() for v in leo.values() if v.grad is not None):
            for k, v in leo.items():
                v.grad = NAN_FALLBACK * v.detach() if k in REGULARISED else torch.zeros_like(v)
        clip_gradients(list(leo.values()), self.grad_clip, self.grad_norm_clip)
        self.optimizer.step()

    # --- adaptation ---------------------------------------------------------------------
    def adapt_inputs(self, support_x: torch.Tensor) -> tuple[Params, torch.Tensor]:
        """Adaptation's inputs: the detached meta-parameters and the support embeddings [n, d] (no graph)."""
        p = {k: v.detach() for k, v in self.meta.items()}
        with torch.no_grad():
            return p, embed(p, support_x, self.net.features)

    def adapt_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        """The frozen body and the classifier [way, d] adapted to the support set (means, no dropout)."""
        p, feats = self.adapt_inputs(support_x)
        classifier = self.leo(p, (feats, support_y), None, True)["classifier"]
        return {**{k: v for k, v in p.items() if is_backbone(k)}, CLASSIFIER: classifier}

    @property
    def test_steps(self) -> int:
        """Test-time inner steps: the latent steps and then the fine-tuning steps (inner_steps + finetune_steps)."""
        return self.inner_steps + self.finetune_steps

    def adapt_recorded(self, support_x: torch.Tensor, support_y: torch.Tensor,
                       upto: int) -> tuple[Predictor, dict[int, Predictor], float]:
        """The step curve of adapt's own two loops (`tracing`), numbered consecutively: steps 0..inner_steps
        are latent steps (the classifier decoded from the codes, their mean, after that many), then step
        inner_steps + f is f fine-tuning steps of the decoded weights. Past the method's own
        inner_steps + finetune_steps, the fine-tuning loop goes on (the latent loop never does)."""
        p, feats = self.adapt_inputs(support_x)
        way, n = int(support_y.max()) + 1, self.inner_steps
        with tracing(max(0, upto - n), first_calls=(0,)) as trace:
            self.leo(p, (feats, support_y), None, True)
        latents, tuned = trace.calls
        onehot = F.one_hot(support_y, way).to(feats.dtype)
        weights = [self.decode(p, q[LATENTS], way, None) for q in latents[:n]] + [q[WEIGHTS] for q in tuned]
        body = {k: v for k, v in p.items() if is_backbone(k)}
        main, curve = step_curve(weights, self.test_steps,
                                 lambda w, s: self.predictor({**body, CLASSIFIER: class_mean(w, onehot).detach()}, way))
        return main, curve, trace.extra_seconds
