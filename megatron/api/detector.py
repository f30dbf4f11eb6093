"""The interface every detector plugin implements (see ``registry_docs/hooks/megatron_register_detectors.md``).

A detector is an ``nn.Module`` wrapping one model. Learners only ever talk to it through this interface,
so MAML, Reptile, ANIL and the baselines work with any detector plugin.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from megatron.types import Batch, Detections

FreezePolicy = Literal["none", "backbone", "backbone+neck"]
#: capabilities a learner may need beyond ``loss``/``predict`` (see :meth:`Detector.unsupported`)
CAPABILITY_SECOND_ORDER = "second_order"  # differentiate ``loss(batch, params)`` twice (MAML/ANIL second order)
CAPABILITY_PROTOTYPES = "prototypes"  # ``box_features`` + ``set_prototypes`` (the proto learner)
GROUPS_FROZEN: dict[str, tuple[str, ...]] = {
    "none": (),
    "backbone": ("backbone",),
    "backbone+neck": ("backbone", "neck"),
}


class DetectorOptions(BaseModel):
    """Options common to every detector; a plugin subclasses this to add its own (``extra='forbid'``)."""

    model_config = ConfigDict(extra="forbid")


class Detector(nn.Module):
    """Abstract detector.

    Subclasses set ``PLUGIN_NAME`` and ``Options`` and implement the abstract methods. The constructor
    signature is fixed: ``Detector(num_classes, input_size, options)``.

    Parameter names are those of ``self.named_parameters()``; ``params`` dicts passed to :meth:`loss` use
    the same names (a subset is allowed: missing names fall back to the module's own tensors).
    """

    PLUGIN_NAME: ClassVar[str]
    Options: ClassVar[type[DetectorOptions]] = DetectorOptions
    #: the stride (input pixels) of the finest feature map boxes are assigned to; ``megatron data check`` warns
    #: about lesions smaller than it at ``data.input_size`` (YOLOX, RetinaNet, FCOS: 8; an FPN with P2: 4)
    SMALLEST_STRIDE: ClassVar[int] = 8

    def __init__(self, num_classes: int, input_size: int, options: DetectorOptions | None = None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self.options = options if options is not None else self.Options()

    # --- what learners call -------------------------------------------------------------------
    def loss(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Training losses for ``batch``; the dict has a scalar ``"loss"`` (the total, to backpropagate).

        With ``params`` the forward pass is functional (``torch.func.functional_call``) so gradients flow
        to those tensors (second order included). BatchNorm policy under ``params``: batch statistics are
        used and the module's running statistics are *not* updated (see :meth:`bn_policy_doc`).
        """
        raise NotImplementedError

    def predict(self, batch: Batch) -> list[Detections]:
        """Boxes, scores and labels per image, in the original image coordinates (``batch.meta``)."""
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[str]]:
        """Parameter names per group; at least ``backbone``, ``neck`` and ``head``. ``head_cls`` lists
        the classifier parameters (re-initialised by :meth:`set_num_classes`)."""
        raise NotImplementedError

    def features(self, batch: Batch) -> torch.Tensor:
        """One embedding per image, ``(B, D)`` (globally pooled backbone/neck features)."""
        raise NotImplementedError

    @classmethod
    def unsupported(cls, options: DetectorOptions) -> dict[str, str]:
        """The capabilities (``CAPABILITY_*``) this detector, with ``options``, does not have, each with the reason.

        Asked before anything is built: a learner that needs one of them (``MetaLearner.required_capabilities``)
        is refused when the run starts, with the reason and the learners that still work. Default: none missing."""
        return {}

    # --- optional: the loss split at the body/head boundary (ANIL's inner loop computes the body once) ----------
    def body_features(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> Any:
        """What the head consumes for ``batch``: the output of the body (the ``backbone`` and ``neck`` groups),
        in whatever form :meth:`head_loss` takes (an mmdet detector: the tuple of neck levels).

        Optional, together with :meth:`head_loss` (see :meth:`supports_head_loss`). ``params`` as in
        :meth:`loss`: with a dict (possibly empty) the pass is functional and the module's BatchNorm running
        statistics are not updated; with ``None`` it is a plain forward."""
        raise NotImplementedError

    def head_loss(self, features: Any, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The losses of :meth:`loss` computed by the head alone from ``features = body_features(batch, ...)``.

        Contract: ``head_loss(body_features(batch, params), batch, params)`` equals ``loss(batch, params)``
        (same numbers within float rounding, same BatchNorm policy). A learner whose inner loop adapts head
        parameters only (ANIL, MAML with ``inner_groups: [head]``) computes the body once per batch and calls
        this at every inner step; ``params`` then holds head parameters only.

        Optional. A detector that does not override it (and :meth:`body_features`) is still fully usable:
        :meth:`supports_head_loss` is False and learners fall back to :meth:`loss` at every inner step, which
        recomputes the body each time (same result, more time)."""
        raise NotImplementedError

    def supports_head_loss(self) -> bool:
        """True when the detector overrides both :meth:`body_features` and :meth:`head_loss`."""
        cls = type(self)
        return cls.head_loss is not Detector.head_loss and cls.body_features is not Detector.body_features

    def box_features(self, batch: Batch, params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the annotated boxes in ``batch``: ``(N, D)`` features and their ``(N,)`` labels.

        These are the features the detector's classifier sees, so that prototype heads can classify with
        them (see :meth:`set_prototypes`)."""
        raise NotImplementedError

    def set_prototypes(self, prototypes: torch.Tensor | None, temperature: float = 10.0) -> None:
        """Replace the classifier by a cosine-similarity classifier against ``prototypes`` ``(C, D)``;
        ``None`` restores the learned classifier."""
        raise NotImplementedError

    def get_prototypes(self) -> tuple[torch.Tensor, float] | None:
        """``(prototypes (C, D), temperature)`` as installed by :meth:`set_prototypes`, or ``None`` while the
        learned classifier is in place. Saved models (:mod:`megatron.training.model_file`) store them so a
        prototype-adapted detector reloads identically: implement it together with :meth:`set_prototypes`."""
        if type(self).set_prototypes is Detector.set_prototypes:
            return None  # no prototype support, so no prototypes
        raise NotImplementedError

    def set_num_classes(self, num_classes: int) -> None:
        """Resize the head to ``num_classes``, re-initialising only the classifier parameters."""
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------------
    def group_of(self, name: str) -> str:
        for group, names in self.parameter_groups().items():
            if group != "head_cls" and name in names:
                return group
        return "other"

    def freeze(self, policy: FreezePolicy) -> None:
        """Freeze parameter groups by name (``none``, ``backbone``, ``backbone+neck``).

        Frozen parameters get ``requires_grad=False`` and the BatchNorm layers inside frozen groups are
        kept in eval mode (their running statistics stop changing) even when the detector is in train mode.
        """
        if policy not in GROUPS_FROZEN:
            raise ValueError(f"unknown freeze policy {policy!r}; choose one of {sorted(GROUPS_FROZEN)}")
        frozen_groups = GROUPS_FROZEN[policy]
        groups = self.parameter_groups()
        frozen = {n for g in frozen_groups for n in groups.get(g, [])}
        for name, p in self.named_parameters():
            p.requires_grad_(name not in frozen)
        self._frozen_prefixes = tuple(frozen_groups)
        self._frozen_bn_modules = [
            m for mname, m in self.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(f"{mname}.{pn}" in frozen for pn, _ in m.named_parameters(recurse=False))
        ]
        self.train(self.training)

    def train(self, mode: bool = True) -> "Detector":
        super().train(mode)
        for m in getattr(self, "_frozen_bn_modules", []):
            m.eval()
        return self

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}
