"""Black boxes: plain, non-differentiable functions of a list of digit arguments.

A black box takes integer arguments, such as the argmax digits of the argument extractor, and never
probabilities. EstiNet learns to call one through a differentiable estimator during training and
calls the real one at test time.
"""

from abc import ABC, abstractmethod

import torch

from estinet.errors import ConfigError


class BlackBox(ABC):
    """Non-differentiable function of integer arguments (B, k) in [0, num_classes), outputs (B,)."""

    name: str
    num_classes: int = 10

    def __call__(self, arguments: torch.Tensor) -> torch.Tensor:
        """Validate the arguments and return the black-box output per list, with no autograd graph.

        Raises TypeError for a non-integer tensor and ValueError for a wrong shape or an argument
        outside [0, num_classes).
        """
        self._validate(arguments)
        with torch.no_grad():
            outputs = self._compute(arguments)
        return outputs.detach()

    @abstractmethod
    def _compute(self, arguments: torch.Tensor) -> torch.Tensor:
        """Compute the outputs (B,) for valid integer arguments (B, k)."""

    def _validate(self, arguments: torch.Tensor) -> None:
        if not isinstance(arguments, torch.Tensor):
            raise TypeError(
                f"black box {self.name!r} expects a torch.Tensor of integer arguments, "
                f"got {type(arguments).__name__}"
            )
        if (
            arguments.dtype.is_floating_point
            or arguments.dtype.is_complex
            or arguments.dtype == torch.bool
        ):
            raise TypeError(
                f"black box {self.name!r} expects integer arguments (such as argmax digits), "
                f"got dtype {arguments.dtype}. Convert probabilities with .argmax(-1) first"
            )
        if arguments.ndim != 2:
            raise ValueError(
                f"black box {self.name!r} expects arguments of shape (B, k), "
                f"got shape {tuple(arguments.shape)}"
            )
        if arguments.numel() > 0:
            low, high = int(arguments.min()), int(arguments.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"black box {self.name!r} expects arguments in [0, {self.num_classes}), "
                    f"got values in [{low}, {high}]"
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_classes={self.num_classes})"


class SumBlackBox(BlackBox):
    """Integer sum of the digit arguments of each list."""

    name = "sum"

    def _compute(self, arguments: torch.Tensor) -> torch.Tensor:
        return arguments.to(torch.int64).sum(dim=1)  # (B,)


BLACK_BOXES: dict[str, type[BlackBox]] = {SumBlackBox.name: SumBlackBox}


def make_black_box(name: str) -> BlackBox:
    """Instantiate the registered black box `name`, raising ConfigError for an unknown name."""
    if name not in BLACK_BOXES:
        known = ", ".join(sorted(BLACK_BOXES))
        raise ConfigError(f"unknown black box {name!r}. Known black boxes: {known}")
    return BLACK_BOXES[name]()
