"""Compute accounting: the currency in which learners are compared fairly.

A unit is one image passed forward or backward through the detector. Learners report every forward pass
with :meth:`ComputeAccount.forward` and every backward pass with :meth:`ComputeAccount.backward`, which
charges the images forwarded into the graph since the last backward (so a second-order MAML outer backward,
which runs back through the inner steps, pays for them again).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ComputeAccount:
    images_forward: int = 0
    images_backward: int = 0
    budget: int | None = None  # in image passes (forward + backward); None: unlimited
    _pending: int = 0

    def forward(self, n_images: int) -> None:
        self.images_forward += int(n_images)
        self._pending += int(n_images)

    def backward(self, n_images: int | None = None) -> None:
        """Charge a backward pass over ``n_images`` (default: all forwarded since the last backward)."""
        n = self._pending if n_images is None else int(n_images)
        self.images_backward += n
        self._pending = 0 if n_images is None else max(0, self._pending - n)

    def discard(self) -> None:
        """Forget forwards that will never be backpropagated (e.g. evaluation, no_grad passes)."""
        self._pending = 0

    @property
    def spent(self) -> int:
        return self.images_forward + self.images_backward

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.spent >= self.budget

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
