"""The `Prompts` container every prompt plugin returns and the model's prompt encoder consumes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# Sparse token labels. 0/1/-1 are the official point labels; 2/3 are how the official prompt encoder embeds a
# box (its two corners as points with these labels); 4 marks a text token (samlight's text prompt, whose
# embedding comes from `Prompts.text_embeddings`), so one N x T token layout can carry every prompt type.
PAD_LABEL, BACKGROUND_LABEL, FOREGROUND_LABEL = -1, 0, 1
BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL, TEXT_LABEL = 2, 3, 4


@dataclass
class Prompts:
    """Prompts for N masks being segmented at once; every field is optional.

    Coordinates are in input pixels (the resized, padded frame the model sees), x before y.

    Attributes:
        point_coords: N x P x 2 float (x, y).
        point_labels: N x P int (1 foreground, 0 background, -1 padding).
        boxes: N x 4 float, xyxy.
        mask_inputs: N x 1 x S/4 x S/4 float logits (the dense prompt).
        text_embeddings: N x D float, l2-normalised CLIP embeddings.
        auto_pad: True (the official behaviour): the prompt encoder appends one padding point when there is no
            box. False: `point_labels` already hold every token, padding included, in the merged layout of
            `merge_prompts` (box corners labelled 2/3, text tokens 4); `boxes` is then None and
            `text_embeddings` are read only where a label is 4.
    """

    point_coords: Tensor | None = None
    point_labels: Tensor | None = None
    boxes: Tensor | None = None
    mask_inputs: Tensor | None = None
    text_embeddings: Tensor | None = None
    auto_pad: bool = True

    def __post_init__(self) -> None:
        if (self.point_coords is None) != (self.point_labels is None):
            raise ValueError("Prompts: point_coords and point_labels must be given together")
        if not self.auto_pad and (self.point_coords is None or self.boxes is not None):
            raise ValueError("Prompts(auto_pad=False) carries every token as points: give points, no boxes")

    @property
    def num_prompts(self) -> int:
        """N, the number of masks these prompts address (0 when every field is empty)."""
        for name in _TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return value.shape[0]
        return 0

    @property
    def num_sparse(self) -> int:
        """Number of sparse prompt entries per mask: points + 2 box corners + 1 text token."""
        n = 0 if self.point_coords is None else self.point_coords.shape[1]
        n += 0 if self.boxes is None else 2
        n += 0 if self.text_embeddings is None else 1
        return n

    def is_ambiguous(self) -> bool:
        """True for a single point and nothing else: the paper's case for three outputs."""
        if not self.auto_pad:
            return False  # per mask: see `ambiguous`
        return self.num_sparse == 1 and self.point_coords is not None and self.mask_inputs is None

    def ambiguous(self) -> Tensor | bool:
        """Which masks get the three outputs: `is_ambiguous()` for official-layout prompts, else an N bool
        tensor (True where the only real token is one foreground/background point and there is no mask input).
        """
        if self.auto_pad:
            return self.is_ambiguous()
        real = self.point_labels != PAD_LABEL  # N x T
        clicks = (self.point_labels == FOREGROUND_LABEL) | (self.point_labels == BACKGROUND_LABEL)
        single = (real.sum(1) == 1) & (clicks.sum(1) == 1)  # N
        return single & (self.mask_inputs is None)

    def to(self, device: torch.device | str) -> Prompts:
        return replace(self, **{name: _to(getattr(self, name), device) for name in _TENSOR_FIELDS})

    def with_points(self, coords: Tensor, labels: Tensor) -> Prompts:
        """Append points (N x k x 2, N x k) to the existing ones, e.g. a corrective click."""
        if self.point_coords is None:
            return replace(self, point_coords=coords, point_labels=labels)
        return replace(
            self,
            point_coords=torch.cat([self.point_coords, coords.to(self.point_coords.dtype)], dim=1),
            point_labels=torch.cat([self.point_labels, labels.to(self.point_labels.dtype)], dim=1),
        )


def _to(t: Tensor | None, device: torch.device | str) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


_TENSOR_FIELDS = ("point_coords", "point_labels", "boxes", "mask_inputs", "text_embeddings")


def as_tokens(prompts: Prompts) -> tuple[Tensor, Tensor]:
    """The sparse tokens the official prompt encoder would build from `prompts`, as points.

    Points (plus the official padding point when there is no box), then the box corners (labels 2, 3), then
    a text token (label 4, coordinates 0). The prompt encoder embeds this layout to the same tokens.

    Returns:
        coords N x T x 2 float, labels N x T long.
    """
    if not prompts.auto_pad:
        return prompts.point_coords.float(), prompts.point_labels.long()
    n = prompts.num_prompts
    device = next(getattr(prompts, k) for k in _TENSOR_FIELDS if getattr(prompts, k) is not None).device
    coords, labels = [torch.zeros(n, 0, 2, device=device)], [torch.zeros(n, 0, dtype=torch.long, device=device)]
    if prompts.point_coords is not None:
        coords.append(prompts.point_coords.float())
        labels.append(prompts.point_labels.long())
    if prompts.point_coords is not None and prompts.boxes is None:
        coords.append(torch.zeros(n, 1, 2, device=device))
        labels.append(torch.full((n, 1), PAD_LABEL, device=device))
    if prompts.boxes is not None:
        coords.append(prompts.boxes.float().reshape(n, 2, 2))
        labels.append(torch.tensor([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], device=device).expand(n, 2))
    if prompts.text_embeddings is not None:
        coords.append(torch.zeros(n, 1, 2, device=device))
        labels.append(torch.full((n, 1), TEXT_LABEL, device=device))
    return torch.cat(coords, 1), torch.cat(labels, 1)


def merge_prompts(candidates: Sequence[Prompts], choice: Tensor) -> Prompts:
    """One prompt per mask from several prompt types, in one static token layout.

    Every candidate addresses the same N masks; mask n keeps candidate `choice[n]`. Tokens are `as_tokens`,
    padded with label -1 to the widest candidate, so the decoder sees each mask's official tokens (plus
    padding tokens only where candidates differ in width: none for the paper's one point vs one box, both
    2 tokens). Sync-free: selection is a gather, never a boolean index.

    Args:
        candidates: K `Prompts` of N masks each (e.g. every configured type sampled over all masks).
        choice: N long in [0, K).

    Returns:
        `Prompts(auto_pad=False)` with point_coords N x T x 2, point_labels N x T, text_embeddings N x D when
        a candidate has text (zeros elsewhere), mask_inputs when every candidate has them.
    Raises:
        ValueError when only some candidates give mask inputs (a per-mask "no mask" dense prompt has no logit
        form yet).
    """
    tokens = [as_tokens(p) for p in candidates]
    width = max(labels.shape[1] for _, labels in tokens)
    coords = torch.stack([_pad(c, (0, 0, 0, width - c.shape[1])) for c, _ in tokens])  # K x N x T x 2
    labels = torch.stack([_pad(lab, (0, width - lab.shape[1]), PAD_LABEL) for _, lab in tokens])  # K x N x T
    n = choice.shape[0]
    pick = choice.view(1, n, 1)
    merged_labels = labels.gather(0, pick.expand(1, n, width))[0]  # N x T
    merged_coords = coords.gather(0, pick[..., None].expand(1, n, width, 2))[0]  # N x T x 2
    text = _merge_optional([p.text_embeddings for p in candidates], choice)
    with_masks = [p.mask_inputs is not None for p in candidates]
    if any(with_masks) and not all(with_masks):
        raise ValueError(
            "merge_prompts: some prompt types give mask_inputs and others do not; one episode over all masks "
            "needs every type of the mixture to give mask inputs, or none"
        )
    masks = _merge_optional([p.mask_inputs for p in candidates], choice)
    return Prompts(
        point_coords=merged_coords,
        point_labels=merged_labels,
        mask_inputs=masks,
        text_embeddings=text,
        auto_pad=False,
    )


def _merge_optional(values: list[Tensor | None], choice: Tensor) -> Tensor | None:
    """Per-mask selection among K optional N x ... tensors (missing ones count as zeros)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    like = present[0]
    stacked = torch.stack([v.to(like.dtype) if v is not None else torch.zeros_like(like) for v in values])
    index = choice.view(1, -1, *([1] * (like.ndim - 1))).expand(1, *like.shape)
    return stacked.gather(0, index)[0]


def _pad(t: Tensor, pad: tuple[int, ...], value: float = 0.0) -> Tensor:
    return torch.nn.functional.pad(t, pad, value=value)
