"""Training methods: how each model turns a batch of (image list, sum) pairs into parameter updates.

A method owns its networks, optimizers and schedulers, and exposes the same small interface to the
training loop: `train_step`, `predict_from_probabilities` (the test-time path) and state dicts for
checkpoints. Methods:

- `estinet` (Estimate and Replace): the argument extractor learns through a differentiable
  black-box estimator. At test time its argmax digits go into the real black box.
- `nalu`: the baseline; extractor + LSTM + NALU trained end to end and used as-is at test time.
- `reinforce`: the extractor samples digit arguments, the real black box scores them, and the
  score-function (REINFORCE) gradient trains the extractor; argmax digits go into the black box.
- `oracle`: the upper bound; the extractor learns from the digit labels (cross-entropy), which
  no other method sees; argmax digits go into the black box.
"""

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from estinet.blackbox import BlackBox
from estinet.errors import ConfigError
from estinet.models.baseline import NaluBaseline
from estinet.models.estimator import BlackBoxEstimator, EstimatorConfig
from estinet.models.extractor import ArgumentExtractor, ExtractorConfig
from estinet.pretrain import PretrainConfig, label_digit_vectors, load_estimator, pretrain_estimator

log = logging.getLogger(__name__)

ESTIMATOR_MODES = ("offline", "online", "hybrid")
LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}
# Keys of the `estimator` config group that configure EstiNet's use of the estimator rather than
# its architecture; they are removed before EstimatorConfig is built.
ESTIMATOR_TRAINING_KEYS = ("training", "checkpoint", "lr", "online_targets", "online_mc_samples")


@dataclass
class StepResult:
    """Outcome of one training step; `skipped` is True when a non-finite value stopped the update.

    `estimator_skipped` is True when EstiNet's online estimator update met a non-finite value and
    was skipped, while the extractor update may still have happened.
    """

    loss: float
    skipped: bool = False
    estimator_loss: float | None = None
    estimator_skipped: bool = False

    @property
    def nonfinite(self) -> bool:
        """True when any update of this step met a non-finite loss or gradient."""
        return self.skipped or self.estimator_skipped


def estimator_architecture(estimator_cfg: DictConfig) -> EstimatorConfig:
    """Build the estimator's architecture config, leaving out EstiNet's training keys."""
    plain = OmegaConf.to_container(estimator_cfg, resolve=True)
    for key in ESTIMATOR_TRAINING_KEYS:
        plain.pop(key, None)
    return EstimatorConfig.from_config(plain)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_factor: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_factor` at `total_steps`."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg: DictConfig, total_steps: int):
    """LambdaLR for train.schedule: `cosine` (with warm-up) or `constant`."""
    if train_cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = int(train_cfg.warmup_fraction * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, warmup, train_cfg.min_lr_factor)
    )


def mean_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the distributions along the last dim."""
    return -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(-1).mean()


def marginal_kl_to_uniform(probabilities: torch.Tensor) -> torch.Tensor:
    """KL(mean distribution of the batch || uniform): zero when every class is used equally often."""
    marginal = probabilities.reshape(-1, probabilities.shape[-1]).mean(0)  # (C,)
    return (marginal * torch.log(marginal.clamp_min(1e-12) * marginal.numel())).sum()


def finite_step(
    loss: torch.Tensor,
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None,
) -> bool:
    """Backpropagate `loss` and step, unless the loss or the gradient norm is not finite.

    Returns False (and leaves the weights untouched) on a non-finite value, so a run never trains
    on NaN or inf.
    """
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    max_norm = grad_clip if grad_clip else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


class Method:
    """Common interface the training loop relies on."""

    name: str
    extractor: ArgumentExtractor
    # True when the test-time prediction is the real black box applied to argmax digits.
    uses_black_box_at_test: bool = True
    uses_digit_labels: bool = False

    def __init__(self) -> None:
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.epoch = 0

    def modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        for module in self.modules().values():
            module.train(mode)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def train_step(
        self, images: torch.Tensor, sums: torch.Tensor, digit_labels: torch.Tensor | None
    ) -> StepResult:
        raise NotImplementedError

    def predict_from_probabilities(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Test-time prediction (L,) float from the extractor's softmax outputs (L, k, C)."""
        raise NotImplementedError

    def extra_predictions(self, probabilities: torch.Tensor) -> dict[str, torch.Tensor]:
        """Further predictions worth reporting for insight, keyed by a metric-name prefix."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {name: module.state_dict() for name, module in self.modules().items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict[str, Any], *, weights_only: bool = False) -> None:
        for name, module in self.modules().items():
            module.load_state_dict(state["modules"][name])
        if weights_only:
            return
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])


class EstiNet(Method):
    """Estimate and Replace: extractor -> estimator in training, extractor -> black box at test.

    Losses and what they update:
    - task loss  `model.loss`(estimator(softmax(extractor(images))), sum) plus the regularizers
      below updates the extractor only. The estimator's weights receive no gradient from it.
    - estimator loss (online and hybrid modes) `model.loss`(estimator(p), black-box target of p),
      with p the extractor's current softmax outputs, detached; updates the estimator only. The
      target comes from calling the black box on digits sampled from p (Monte Carlo) or on the
      argmax digits (`estimator.online_targets`).
    - `model.entropy_weight` * mean per-image entropy of p: a positive weight penalizes high
      entropy, pushing the extractor toward the black box's interface (one digit per image).
    - `model.marginal_weight` * KL(batch-mean of p || uniform): keeps every digit class in use.
      It assumes the arguments are roughly balanced in the data, which holds for MNIST digits.
    """

    name = "estinet"

    def __init__(
        self,
        cfg: DictConfig,
        black_box: BlackBox,
        device: torch.device,
        total_steps: int,
        *,
        initialize_estimator: bool = True,
    ):
        super().__init__()
        self.cfg = cfg.model
        self.black_box = black_box
        self.device = device
        self.mode = cfg.estimator.training
        if self.mode not in ESTIMATOR_MODES:
            raise ConfigError(
                f"estimator.training={self.mode!r} is invalid. Use one of {', '.join(ESTIMATOR_MODES)}"
            )
        self.loss_fn = LOSSES[self.cfg.loss]
        self.grad_clip = cfg.train.grad_clip
        self.online_targets = cfg.estimator.online_targets
        self.online_mc_samples = cfg.estimator.online_mc_samples

        self.extractor = ArgumentExtractor(ExtractorConfig.from_config(cfg.extractor)).to(device)
        if initialize_estimator:
            self.estimator = self._initial_estimator(cfg).to(device)
        else:  # weights come from a checkpoint next
            self.estimator = BlackBoxEstimator(estimator_architecture(cfg.estimator)).to(device)
        self.estimator_trainable = self.mode in ("online", "hybrid")
        for parameter in self.estimator.parameters():
            parameter.requires_grad_(False)

        # fused=True updates all parameters in one kernel: about 2% of a CPU training step
        # (docs/benchmarks.md). A resumed run keeps the setting stored in its checkpoint.
        self.optimizers["extractor"] = torch.optim.Adam(
            self.extractor.parameters(), lr=cfg.train.lr, fused=True
        )
        self.schedulers["extractor"] = make_scheduler(
            self.optimizers["extractor"], cfg.train, total_steps
        )
        if self.estimator_trainable:
            self.optimizers["estimator"] = torch.optim.Adam(
                self.estimator.parameters(), lr=cfg.estimator.lr, fused=True
            )
        # Draws of the Monte-Carlo black-box targets; part of the checkpointed state.
        self.sampling_generator = torch.Generator().manual_seed(int(cfg.seed) + 7919)

    def _initial_estimator(self, cfg: DictConfig) -> BlackBoxEstimator:
        architecture = estimator_architecture(cfg.estimator)
        if self.mode == "online":
            return BlackBoxEstimator(architecture)
        if cfg.estimator.checkpoint:
            log.info("loading the pretrained estimator from %s", cfg.estimator.checkpoint)
            return load_estimator(
                cfg.estimator.checkpoint,
                map_location=self.device,
                expected_config=architecture,
                expected_black_box=self.black_box.name,
            )
        log.info("no estimator.checkpoint given: pretraining the estimator in-process")
        estimator, metrics = pretrain_estimator(
            architecture,
            PretrainConfig.from_config(cfg.pretrain),
            self.black_box,
            device=self.device,
            seed=int(cfg.seed),
            progress=bool(cfg.train.progress),
        )
        log.info(
            "pretrained estimator: one-hot MAE k=10 %.3f, k=100 %.3f, soft MAE k=10 %.3f",
            metrics["one_hot_mae_k10"], metrics["one_hot_mae_k100"], metrics["soft_mae_k10"],
        )
        return estimator

    def modules(self) -> dict[str, nn.Module]:
        return {"extractor": self.extractor, "estimator": self.estimator}

    def train(self, mode: bool = True) -> None:
        self.extractor.train(mode)
        # A frozen estimator always runs in eval mode; a trained one follows the loop's mode.
        self.estimator.train(mode and self.estimator_trainable)

    def regularizer_weight(self, base: float, start_epoch: int, ramp_epochs: int) -> float:
        """Weight `base` from `start_epoch` on, reached linearly over `ramp_epochs` epochs."""
        if base == 0 or self.epoch < start_epoch:
            return 0.0
        if ramp_epochs <= 0:
            return base
        return base * min(1.0, (self.epoch - start_epoch + 1) / ramp_epochs)

    def _update_estimator(self, probabilities: torch.Tensor) -> float | None:
        vectors = probabilities.detach()
        if self.online_targets == "argmax":
            vectors = F.one_hot(vectors.argmax(-1), vectors.shape[-1]).float()
        targets = label_digit_vectors(
            vectors,
            self.black_box,
            soft_targets="monte_carlo",
            mc_samples=self.online_mc_samples,
            generator=self.sampling_generator,
        )
        for parameter in self.estimator.parameters():
            parameter.requires_grad_(True)
        loss = self.loss_fn(self.estimator(vectors), targets)
        ok = finite_step(
            loss, list(self.estimator.parameters()), self.optimizers["estimator"], self.grad_clip
        )
        for parameter in self.estimator.parameters():
            parameter.requires_grad_(False)
        return float(loss.detach()) if ok else None

    def _stand_in(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Compute the differentiable stand-in for the black box that the extractor learns through."""
        if self.cfg.get("diagnostic_expected_sum", False):
            # NOTE: diagnostic only, not a black-box method. The closed-form expected sum
            # sum_i sum_d d * p_i(d) requires knowing that the black box is `sum`. It isolates
            # the optimization landscape from the estimator's approximation error.
            values = torch.arange(probabilities.shape[-1], dtype=probabilities.dtype,
                                  device=probabilities.device)
            return (probabilities * values).sum(dim=(-2, -1))  # (B,)
        return self.estimator(probabilities)

    def train_step(self, images, sums, digit_labels=None) -> StepResult:
        batch_size, length = images.shape[:2]
        logits = self.extractor(images.flatten(0, 1)).view(batch_size, length, -1)  # (B, k, C)
        probabilities = torch.softmax(logits, dim=-1)

        estimator_loss = None
        if self.estimator_trainable:
            estimator_loss = self._update_estimator(probabilities)

        loss = self.loss_fn(self._stand_in(probabilities), sums.float())
        entropy_weight = self.regularizer_weight(
            self.cfg.entropy_weight, self.cfg.entropy_start_epoch, self.cfg.entropy_ramp_epochs
        )
        if entropy_weight:
            loss = loss + entropy_weight * mean_entropy(probabilities)
        if self.cfg.marginal_weight:
            loss = loss + self.cfg.marginal_weight * marginal_kl_to_uniform(probabilities)

        ok = finite_step(
            loss, list(self.extractor.parameters()), self.optimizers["extractor"], self.grad_clip
        )
        if ok:
            self.schedulers["extractor"].step()
        return StepResult(
            loss=float(loss.detach()),
            skipped=not ok,
            estimator_loss=estimator_loss,
            estimator_skipped=self.estimator_trainable and estimator_loss is None,
        )

    def predict_from_probabilities(self, probabilities):
        return self.black_box(probabilities.argmax(-1)).float()

    def extra_predictions(self, probabilities):
        # The estimator in place of the black box: how well the stand-in itself would do.
        return {"estimator": self.estimator(probabilities)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["sampling_generator"] = self.sampling_generator.get_state()
        return state

    def load_state_dict(self, state, *, weights_only=False) -> None:
        super().load_state_dict(state, weights_only=weights_only)
        if not weights_only:
            self.sampling_generator.set_state(state["sampling_generator"])


class NaluMethod(Method):
    """The NALU baseline: one network trained end to end on sums, used as-is at test time."""

    name = "nalu"
    uses_black_box_at_test = False

    def __init__(self, cfg: DictConfig, black_box: BlackBox, device: torch.device, total_steps: int,
                 **_: Any):
        super().__init__()
        self.loss_fn = LOSSES[cfg.model.loss]
        self.grad_clip = cfg.train.grad_clip
        self.network = NaluBaseline(
            ExtractorConfig.from_config(cfg.extractor), estimator_architecture(cfg.estimator)
        ).to(device)
        self.extractor = self.network.extractor
        # model.lr, when set, replaces train.lr for the whole network (conf/model/nalu.yaml).
        lr = cfg.model.get("lr") or cfg.train.lr
        self.optimizers["network"] = torch.optim.Adam(self.network.parameters(), lr=lr, fused=True)
        self.schedulers["network"] = make_scheduler(self.optimizers["network"], cfg.train, total_steps)

    def modules(self) -> dict[str, nn.Module]:
        return {"network": self.network}

    def train_step(self, images, sums, digit_labels=None) -> StepResult:
        prediction, _ = self.network(images)
        loss = self.loss_fn(prediction, sums.float())
        ok = finite_step(
            loss, list(self.network.parameters()), self.optimizers["network"], self.grad_clip
        )
        if ok:
            self.schedulers["network"].step()
        return StepResult(loss=float(loss.detach()), skipped=not ok)

    def predict_from_probabilities(self, probabilities):
        return self.network.head(probabilities)


class ExtractorMethod(Method):
    """A method that trains the argument extractor alone and calls the real black box at test time.

    Builds the extractor, its Adam optimizer (`train.lr`) and its scheduler. Subclasses implement
    `train_step`.
    """

    def __init__(self, cfg: DictConfig, black_box: BlackBox, device: torch.device, total_steps: int,
                 **_: Any):
        super().__init__()
        self.black_box = black_box
        self.device = device
        self.grad_clip = cfg.train.grad_clip
        self.extractor = ArgumentExtractor(ExtractorConfig.from_config(cfg.extractor)).to(device)
        # Fused Adam, as for EstiNet's extractor, so that the optimizer is not what differs.
        self.optimizers["extractor"] = torch.optim.Adam(
            self.extractor.parameters(), lr=cfg.train.lr, fused=True
        )
        self.schedulers["extractor"] = make_scheduler(
            self.optimizers["extractor"], cfg.train, total_steps
        )

    def modules(self) -> dict[str, nn.Module]:
        return {"extractor": self.extractor}

    def step_extractor(self, loss: torch.Tensor) -> bool:
        """Update the extractor on `loss`. Returns False when a non-finite value skipped the step."""
        ok = finite_step(
            loss, list(self.extractor.parameters()), self.optimizers["extractor"], self.grad_clip
        )
        if ok:
            self.schedulers["extractor"].step()
        return ok

    def predict_from_probabilities(self, probabilities):
        return self.black_box(probabilities.argmax(-1)).float()


REINFORCE_BASELINES = ("leave_one_out", "ema", "none")


@dataclass
class ReinforceConfig:
    """Settings of the REINFORCE baseline (conf/model/reinforce.yaml)."""

    name: str = "reinforce"
    samples: int = 32  # digit-argument lists drawn per training list and step
    baseline: str = "leave_one_out"  # leave_one_out | ema | none
    baseline_decay: float = 0.99  # decay of the moving-average baseline (baseline=ema)
    entropy_weight: float = 3.0  # weight of the entropy bonus (> 0 rewards high entropy)
    marginal_weight: float = 0.0  # weight of KL(batch-mean digit distribution || uniform)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(
                f"model.samples={self.samples} is invalid: expected an integer >= 1, for example "
                "model.samples=8"
            )
        if self.baseline not in REINFORCE_BASELINES:
            raise ConfigError(
                f"model.baseline={self.baseline} is invalid: expected one of "
                f"{', '.join(REINFORCE_BASELINES)}, for example model.baseline=leave_one_out"
            )
        if self.baseline == "leave_one_out" and self.samples < 2:
            raise ConfigError(
                f"model.baseline=leave_one_out needs model.samples >= 2, got {self.samples}. "
                "Raise model.samples or use model.baseline=ema"
            )
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ConfigError(
                f"model.baseline_decay={self.baseline_decay} is invalid: expected a number in "
                "[0, 1), for example model.baseline_decay=0.99"
            )
        for key in ("entropy_weight", "marginal_weight"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"model.{key}={value} is invalid: expected a number >= 0, for example "
                    f"model.{key}=0.0"
                )

    @classmethod
    def from_config(cls, cfg: Any) -> "ReinforceConfig":
        """Build the config from the `model` group, raising ConfigError for invalid keys."""
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg))
        except OmegaConfBaseException as error:
            raise ConfigError(f"invalid model config for reinforce: {error}") from error


class ReinforceMethod(ExtractorMethod):
    """REINFORCE: the extractor learns from black-box rewards, with no estimator and no labels.

    Each step draws `model.samples` digit lists per training list, each digit independently from
    the extractor's softmax p. The real black box maps every drawn list d to an output, and the
    reward is r(d) = -|black_box(d) - target sum|. The score-function estimator of the gradient
    of E[r] is mean over draws of (r - b) * grad log p(d), with log p(d) the sum over the list of
    log p(d_i | image_i). The black box is only called on integer draws and its outputs carry no
    gradient, so nothing is backpropagated through it.

    The baseline b (`model.baseline`) lowers the variance of the estimator without biasing it:
    - `leave_one_out` (default): for each draw, the mean reward of the other draws of the same
      list. It tracks how hard each list is, which a single running number cannot. It needs
      samples >= 2, and the extra draws cost only black-box calls, not extractor passes.
    - `ema`: an exponential moving average of the batch-mean reward with decay
      `model.baseline_decay`, taken before the current batch is added. It works with one draw.
    - `none`: b = 0, kept to measure what the baseline buys.

    `model.entropy_weight` adds an entropy bonus that delays the collapse of p onto one digit, and
    `model.marginal_weight` the batch-marginal KL term that EstiNet uses. StepResult.loss is the
    mean absolute error of the sampled sums (the negative mean reward), because the value of the
    surrogate loss has no meaning of its own.
    """

    name = "reinforce"

    def __init__(self, cfg: DictConfig, black_box: BlackBox, device: torch.device, total_steps: int,
                 **kwargs: Any):
        self.settings = ReinforceConfig.from_config(cfg.model)
        super().__init__(cfg, black_box, device, total_steps, **kwargs)
        # Draws of the digit arguments. A CPU generator, saved in checkpoints for exact resumes.
        self.sampling_generator = torch.Generator().manual_seed(int(cfg.seed) + 7919)
        # The moving-average baseline of baseline=ema. It stays None until the first step.
        self.reward_baseline: float | None = None

    def sample_arguments(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Draw digit lists (S, B, k) int64 from the softmax outputs (B, k, C), on their device."""
        batch_size, length, num_classes = probabilities.shape
        flat = probabilities.detach().reshape(batch_size * length, num_classes).cpu().double()
        digits = torch.multinomial(
            flat, self.settings.samples, replacement=True, generator=self.sampling_generator
        )  # (B * k, S)
        digits = digits.view(batch_size, length, self.settings.samples).permute(2, 0, 1)
        return digits.to(probabilities.device)

    def rewards(self, arguments: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
        """Negative absolute error (S, B) of the black-box outputs of the drawn lists (S, B, k)."""
        samples, batch_size, length = arguments.shape
        outputs = self.black_box(arguments.reshape(samples * batch_size, length))  # (S * B,)
        outputs = outputs.view(samples, batch_size).float()
        return -(outputs - sums.float()).abs()

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Subtract the configured baseline from the rewards (S, B) and update the moving average."""
        if self.settings.baseline == "leave_one_out":
            others = (rewards.sum(0, keepdim=True) - rewards) / (rewards.shape[0] - 1)
            return rewards - others
        if self.settings.baseline == "none":
            return rewards
        batch_mean = float(rewards.mean())
        if self.reward_baseline is None:
            self.reward_baseline = batch_mean
        advantages = rewards - self.reward_baseline
        decay = self.settings.baseline_decay
        self.reward_baseline = decay * self.reward_baseline + (1 - decay) * batch_mean
        return advantages

    def train_step(self, images, sums, digit_labels=None) -> StepResult:
        batch_size, length = images.shape[:2]
        logits = self.extractor(images.flatten(0, 1)).view(batch_size, length, -1)  # (B, k, C)
        log_probabilities = torch.log_softmax(logits, dim=-1)
        probabilities = log_probabilities.exp()

        with torch.no_grad():
            arguments = self.sample_arguments(probabilities)  # (S, B, k)
            rewards = self.rewards(arguments, sums)  # (S, B)
            advantages = self.advantages(rewards)  # (S, B)

        expanded = log_probabilities.unsqueeze(0).expand(arguments.shape[0], -1, -1, -1)
        chosen = expanded.gather(-1, arguments.unsqueeze(-1)).squeeze(-1)  # (S, B, k)
        loss = -(advantages * chosen.sum(-1)).mean()
        if self.settings.entropy_weight:
            loss = loss - self.settings.entropy_weight * mean_entropy(probabilities)
        if self.settings.marginal_weight:
            loss = loss + self.settings.marginal_weight * marginal_kl_to_uniform(probabilities)

        ok = self.step_extractor(loss)
        return StepResult(loss=float(-rewards.mean()), skipped=not ok)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["sampling_generator"] = self.sampling_generator.get_state()
        state["reward_baseline"] = self.reward_baseline
        return state

    def load_state_dict(self, state, *, weights_only=False) -> None:
        super().load_state_dict(state, weights_only=weights_only)
        if not weights_only:
            self.sampling_generator.set_state(state["sampling_generator"])
            self.reward_baseline = state["reward_baseline"]


class OracleMethod(ExtractorMethod):
    """Supervised upper bound: the extractor learns the digit labels by cross-entropy.

    It is the only method that receives digit labels: `uses_digit_labels` makes the training loop
    pass them. Its test MAE therefore estimates the best that argmax digits fed to the black box
    can reach with this extractor and training budget. At test time it is used exactly like EstiNet.
    """

    name = "oracle"
    uses_digit_labels = True

    def train_step(self, images, sums, digit_labels=None) -> StepResult:
        if digit_labels is None:
            raise ValueError(
                "digit_labels is missing: the oracle trains on the digit labels (B, k) of each "
                "list, which the training loop passes because uses_digit_labels is True"
            )
        logits = self.extractor(images.flatten(0, 1))  # (B * k, C)
        loss = F.cross_entropy(logits, digit_labels.flatten().long())
        ok = self.step_extractor(loss)
        return StepResult(loss=float(loss.detach()), skipped=not ok)


METHODS: dict[str, type[Method]] = {
    "estinet": EstiNet,
    "nalu": NaluMethod,
    "reinforce": ReinforceMethod,
    "oracle": OracleMethod,
}


def build_method(
    cfg: DictConfig,
    black_box: BlackBox,
    device: torch.device,
    total_steps: int,
    *,
    initialize_estimator: bool = True,
) -> Method:
    """Instantiate the method named by `model.name`.

    With initialize_estimator=False, EstiNet skips loading or pretraining its estimator because
    the caller restores all weights from a checkpoint.
    """
    name = cfg.model.name
    if name not in METHODS:
        raise ConfigError(f"model={name!r} is unknown. Use one of {', '.join(METHODS)}")
    return METHODS[name](cfg, black_box, device, total_steps,
                         initialize_estimator=initialize_estimator)
