"""The prompt-type contract (`PromptType`), the context a prompt type may read, and the short-name registry.

A prompt type turns ground-truth masks into the first prompt of an interactive episode. New types subclass
`PromptType`, are selected in YAML by `class_path`, and may register a short name in the `samlight.prompts`
entry-point group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import Tensor

from samlight.prompts.types import Prompts

ENTRY_POINT_GROUP = "samlight.prompts"


@dataclass
class PromptContext:
    """What a prompt type may look at besides the ground-truth masks (all optional).

    Attributes:
        images: B x 3 x S x S float, the normalised, padded batch images.
        image_index: N long, the image of `images` each mask belongs to.
        input_sizes: B x 2 long, (H, W) of each image inside the padded S x S frame.
        text_embeddings: N x D float, precomputed per-mask CLIP embeddings from the shard.
    """

    images: Tensor | None = None
    image_index: Tensor | None = None
    input_sizes: Tensor | None = None
    text_embeddings: Tensor | None = None


class ShowsConfig:
    """`repr` as the constructor call, e.g. `BoxPrompt(noise_std=0.1, max_noise=20.0)`.

    For configuration objects whose public attributes are their keyword arguments, in order (YAML dumps and
    error messages name the object with it).
    """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class PromptType(ShowsConfig, ABC):
    """One kind of initial prompt (point, box, mask, text, ...): ground-truth masks in, `Prompts` out.

    Subclasses set `name` (the short name used in metric names such as `val/<name>/miou@1`) and implement
    `sample`. They hold configuration only: no state changes between calls, randomness comes from `generator`.
    """

    name: ClassVar[str] = "prompt"

    @abstractmethod
    def sample(
        self,
        gt_masks: Tensor,
        *,
        context: PromptContext | None = None,
        generator: torch.Generator | None = None,
    ) -> Prompts:
        """Initial prompts for N masks.

        Args:
            gt_masks: N x S x S bool, ground truth in the input frame.
            context: images and per-mask extras some prompt types need (text crops, image sizes).
            generator: random source on the masks' device; None uses torch's default.

        Returns:
            `Prompts` with N entries in input-pixel coordinates.
        """

    def mask_weights(self, gt_masks: Tensor, *, context: PromptContext | None = None) -> Tensor:
        """N float loss weights; 0 excludes a mask this prompt type cannot serve (e.g. too small for CLIP)."""
        return torch.ones(gt_masks.shape[0], device=gt_masks.device)

    @property
    def text_embed_dim(self) -> int | None:
        """Width of the text embeddings this type emits (the model then needs a text projection), else None."""
        return None


def check_prompts(prompts: Prompts, *, num_masks: int, image_size: int, source: str) -> Prompts:
    """Raise a `ValueError` naming `source` when a prompt plugin returned tensors of the wrong shape."""
    problems = []
    if not isinstance(prompts, Prompts):
        raise TypeError(f"prompt plugin {source} returned {type(prompts).__name__}; it must return Prompts")
    expected = {
        "point_coords": lambda s: len(s) == 3 and s[0] == num_masks and s[2] == 2,
        "point_labels": lambda s: len(s) == 2 and s[0] == num_masks,
        "boxes": lambda s: tuple(s) == (num_masks, 4),
        "mask_inputs": lambda s: tuple(s) == (num_masks, 1, image_size // 4, image_size // 4),
        "text_embeddings": lambda s: len(s) == 2 and s[0] == num_masks,
    }
    shapes = {
        "point_coords": f"{num_masks} x P x 2",
        "point_labels": f"{num_masks} x P",
        "boxes": f"{num_masks} x 4",
        "mask_inputs": f"{num_masks} x 1 x {image_size // 4} x {image_size // 4}",
        "text_embeddings": f"{num_masks} x D",
    }
    for field_name, ok in expected.items():
        value = getattr(prompts, field_name)
        if value is not None and not ok(tuple(value.shape)):
            problems.append(f"{field_name} has shape {tuple(value.shape)}, expected {shapes[field_name]}")
    if prompts.point_coords is not None and prompts.point_coords.shape[:2] != prompts.point_labels.shape:
        problems.append("point_coords and point_labels disagree on N x P")
    if prompts.num_sparse == 0 and prompts.mask_inputs is None:
        problems.append("no prompt at all (every field is None)")
    if problems:
        raise ValueError(
            f"prompt plugin {source} returned malformed Prompts for {num_masks} masks at input size "
            f"{image_size}: " + "; ".join(problems) + ". Fix its sample() to follow samlight.prompts.Prompts."
        )
    return prompts


def available_prompt_types() -> dict[str, str]:
    """Short name -> 'module:Class' for every prompt type registered in the `samlight.prompts` entry points."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve_prompt_type(name: str) -> type[PromptType]:
    """The class registered under short name `name` (e.g. "point") in the `samlight.prompts` group."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, PromptType)):
                raise TypeError(f"entry point {name!r} = {ep.value} is not a samlight PromptType subclass")
            return cls
    known = ", ".join(sorted(available_prompt_types())) or "none"
    raise KeyError(
        f"unknown prompt type {name!r}; registered short names: {known}. Use a class_path or register the "
        f"class under the '{ENTRY_POINT_GROUP}' entry-point group."
    )


def as_prompt_type(spec: PromptType | str) -> PromptType:
    """A prompt type instance from an instance or a short name (built with default arguments)."""
    if isinstance(spec, PromptType):
        return spec
    if isinstance(spec, str):
        return resolve_prompt_type(spec)()
    raise TypeError(f"expected a PromptType or a short name, got {type(spec).__name__}")
